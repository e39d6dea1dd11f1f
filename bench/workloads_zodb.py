"""The workloads, written for ZODB (FileStorage, ZEO, blobs, BTrees).

Same functions, arguments and results as `workloads_dobbin`.  Durability:
FileStorage flushes and fsyncs its file at the end of every commit
(`FileStorage._finish_finish`), locally and behind a ZEO server alike;
blob files are moved into the blob directory without an fsync.
"""

import os
import shutil

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage

from bench.spec import (CONTENDED_OBJECTS, CYCLED_ITEMS, MIB, READ_CHUNK, WRITERS, clock,
                        expect, item_fields, peak_rss_mib, shared_clock, touch)

SYSTEM = "zodb"


class Item(Persistent):
    """The benchmark object: a short name, an int value, three short tags."""

    def __init__(self, name, value, tags):
        self.name = name
        self.value = value
        self.tags = tags


class Payload(Persistent):
    """Holds W7's blob."""

    def __init__(self, data):
        self.data = data


def _open_db(path, **kwargs):
    db = ZODB.DB(FileStorage(path, **kwargs))
    return db, db.open()


def _cycled_items(path, count):
    db, conn = _open_db(path)
    root = conn.root()
    if "items" not in root:
        root["items"] = [Item(*item_fields(i)) for i in range(count)]
        transaction.commit()
    return db, root["items"]


def w1(path, commits):
    """Small commits: each changes one of 100 items' value."""
    db, items = _cycled_items(path, CYCLED_ITEMS)
    before = sum(item.value for item in items)
    start = clock()
    for i in range(commits):
        items[i % CYCLED_ITEMS].value += 1
        transaction.commit()
    elapsed = clock() - start
    expect(sum(item.value for item in items) == before + commits, "W1 lost commits")
    db.close()
    return {"commits_per_s": commits / elapsed}


def w2(path, objects):
    """One commit of `objects` new items inserted into the B-tree."""
    db, conn = _open_db(path)
    conn.root()["tree"] = OOBTree()
    transaction.commit()
    tree = conn.root()["tree"]
    start = clock()
    for i in range(objects):
        tree[i] = Item(*item_fields(i))
    transaction.commit()
    elapsed = clock() - start
    expect(len(tree) == objects, "W2 stored %d items, not %d" % (len(tree), objects))
    db.close()
    return {"objects_per_s": objects / elapsed}


def _open(path, name):
    start = clock()
    db, conn = _open_db(path)
    container = conn.root()[name]
    return db, container, clock() - start


def w3(path, objects):
    """In a fresh process: open, scan every item of the tree, peak RSS."""
    db, tree, opened = _open(path, "tree")
    start = clock()
    count = total = 0
    for _key, item in tree.items():
        total += touch(item)
        count += 1
    scanned = clock() - start
    expect(count == objects, "W3 scanned %d items, not %d" % (count, objects))
    db.close()
    return {"open_ms": opened * 1000, "scan_s": scanned, "scan_objects_per_s": count / scanned,
            "peak_rss_mib": peak_rss_mib()}


def w4_setup(path, transactions):
    """A file of `transactions` small commits (W1's workload); closing saves the index."""
    w1(path, transactions)
    expect(os.path.exists(path + ".index"), "ZODB saved no index file")
    return {}


def w4(path, drop_index=False):
    """In a fresh process: open a file of many transactions, with or without its .index."""
    if drop_index:
        os.remove(path + ".index")
    db, items, opened = _open(path, "items")
    expect(len(items) == CYCLED_ITEMS, "W4 found %d items" % len(items))
    db.close()
    return {"open_ms": opened * 1000}


def w5_setup(path):
    """The counters both W5 writers use: WRITERS x CONTENDED_OBJECTS items at 0."""
    db, conn = _open_db(path)
    conn.root()["items"] = [Item("counter%d" % i, 0, [])
                            for i in range(WRITERS * CONTENDED_OBJECTS)]
    transaction.commit()
    db.close()
    return {}


def w5_worker(target, writer, commits, shared, go):
    """One W5 process: `commits` increments through ZEO, retried on conflict."""
    import ZEO

    host, port = target.rsplit(":", 1)
    db = ZEO.DB((host, int(port)))
    conn = db.open()
    items = conn.root()["items"]
    first = 0 if shared else writer * CONTENDED_OBJECTS
    mine = items[first:first + CONTENDED_OBJECTS]
    for item in mine:
        item.value  # noqa: B018 (load them all before the clock starts)
    transaction.abort()
    go()
    turns = 0
    start = shared_clock()
    for i in range(commits):
        item = mine[i % CONTENDED_OBJECTS]
        for attempt in transaction.manager.attempts(10_000):
            turns += 1
            with attempt:
                item.value += 1
    end = shared_clock()
    db.close()
    return {"start": start, "end": end, "retries": turns - commits}


def w5_counters(path):
    """Every W5 counter's value, in order."""
    db, conn = _open_db(path)
    counters = [item.value for item in conn.root()["items"]]
    db.close()
    return {"counters": counters}


def w7(path, source, mib):
    """Store a file of `mib` MiB as a blob with one commit, then read it back after reopening."""
    size = mib * MIB
    blob_dir = path + ".blobs"
    db, conn = _open_db(path, blob_dir=blob_dir)
    start = clock()
    blob = Blob()
    with open(source, "rb") as f, blob.open("w") as out:
        shutil.copyfileobj(f, out, MIB)
    conn.root()["payload"] = Payload(blob)
    transaction.commit()
    written = clock() - start
    db.close()
    db, conn = _open_db(path, blob_dir=blob_dir)
    blob = conn.root()["payload"].data
    # Read as Dobbin's stream is, a chunk at a time (one read of it all
    # would time building a 100 MiB bytes object), and checked afterwards.
    start = clock()
    read = 0
    with blob.open("r") as f:
        for chunk in iter(lambda: f.read(READ_CHUNK), b""):
            read += len(chunk)
    elapsed = clock() - start
    expect(read == size, "W7 read %d bytes, not %d" % (read, size))
    with blob.open("r") as f, open(source, "rb") as original:
        expect(f.read() == original.read(), "W7 read back different bytes")
    db.close()
    return {"write_mib_s": mib / written, "read_mib_s": mib / elapsed}
