"""The workloads, written for Durus (FileStorage, its storage server, BTree).

Same functions, arguments and results as `workloads_dobbin`.  Durability:
Durus's FileStorage never fsyncs a commit: `durus.file.File.write`
flushes Python's buffer to the operating system and `fsync` is called
only when packing.  So stock Durus figures are "no fsync".  W1 also runs
`FsyncFileStorage` below, which adds one fsync after each commit, to see
what Durus costs with the durability Dobbin and ZODB give.  Durus
zlib-compresses each pickled state by default; we leave that on.  Durus
logs every commit at INFO to stderr unless told otherwise; we raise its
logger to WARNING, as an application embedding it would.
"""

import logging


from durus.btree import BTree
from durus.connection import Connection
from durus.error import ConflictError
from durus.file_storage import FileStorage
from durus.persistent import Persistent

from bench.spec import (CONTENDED_OBJECTS, CYCLED_ITEMS, MIB, WRITERS, clock, expect,
                        item_fields, peak_rss_mib, shared_clock, touch)

SYSTEM = "durus"

logging.getLogger("durus").setLevel(logging.WARNING)


class Item(Persistent):
    """The benchmark object: a short name, an int value, three short tags."""

    def __init__(self, name, value, tags):
        self.name = name
        self.value = value
        self.tags = tags


class Payload(Persistent):
    """Holds W7's bytes."""

    def __init__(self, data):
        self.data = data


class FsyncFileStorage(FileStorage):
    """Durus's FileStorage plus one fsync at the end of each commit (ours, not Durus's)."""

    def end(self, handle_invalidations=None):
        FileStorage.end(self, handle_invalidations)
        self.shelf.get_file().fsync()


def _connect(path, fsync=False):
    storage = (FsyncFileStorage if fsync else FileStorage)(path)
    return Connection(storage)


def _cycled_items(path, count, fsync=False):
    conn = _connect(path, fsync)
    root = conn.get_root()
    if "items" not in root:
        root["items"] = [Item(*item_fields(i)) for i in range(count)]
        conn.commit()
    return conn, root["items"]


def w1(path, commits, fsync=False):
    """Small commits: each changes one of 100 items' value."""
    conn, items = _cycled_items(path, CYCLED_ITEMS, fsync)
    before = sum(item.value for item in items)
    start = clock()
    for i in range(commits):
        items[i % CYCLED_ITEMS].value += 1
        conn.commit()
    elapsed = clock() - start
    expect(sum(item.value for item in items) == before + commits, "W1 lost commits")
    conn.storage.close()
    return {"commits_per_s": commits / elapsed}


def w2(path, objects):
    """One commit of `objects` new items inserted into the B-tree."""
    conn = _connect(path)
    conn.get_root()["tree"] = BTree()
    conn.commit()
    tree = conn.get_root()["tree"]
    start = clock()
    for i in range(objects):
        tree[i] = Item(*item_fields(i))
    conn.commit()
    elapsed = clock() - start
    expect(len(tree) == objects, "W2 stored %d items, not %d" % (len(tree), objects))
    conn.storage.close()
    return {"objects_per_s": objects / elapsed}


def _open(path, name):
    start = clock()
    conn = _connect(path)
    container = conn.get_root()[name]
    return conn, container, clock() - start


def w3(path, objects):
    """In a fresh process: open, scan every item of the tree, peak RSS."""
    conn, tree, opened = _open(path, "tree")
    start = clock()
    count = total = 0
    for _key, item in tree.iteritems():
        total += touch(item)
        count += 1
    scanned = clock() - start
    expect(count == objects, "W3 scanned %d items, not %d" % (count, objects))
    conn.storage.close()
    return {"open_ms": opened * 1000, "scan_s": scanned, "scan_objects_per_s": count / scanned,
            "peak_rss_mib": peak_rss_mib()}


def w4_setup(path, transactions):
    """A file of `transactions` small commits (W1's workload)."""
    w1(path, transactions)
    return {}


def w4(path):
    """In a fresh process: open a file of many transactions."""
    conn, items, opened = _open(path, "items")
    expect(len(items) == CYCLED_ITEMS, "W4 found %d items" % len(items))
    conn.storage.close()
    return {"open_ms": opened * 1000}


def w5_setup(path):
    """The counters both W5 writers use: WRITERS x CONTENDED_OBJECTS items at 0."""
    conn = _connect(path)
    conn.get_root()["items"] = [Item("counter%d" % i, 0, [])
                                for i in range(WRITERS * CONTENDED_OBJECTS)]
    conn.commit()
    conn.storage.close()
    return {}


def w5_worker(target, writer, commits, shared, go):
    """One W5 process: `commits` increments through the Durus server, retried on conflict."""
    from durus.client_storage import ClientStorage

    host, port = target.rsplit(":", 1)
    conn = Connection(ClientStorage(host=host, port=int(port)))
    items = conn.get_root()["items"]
    first = 0 if shared else writer * CONTENDED_OBJECTS
    mine = items[first:first + CONTENDED_OBJECTS]
    for item in mine:
        item.value  # noqa: B018 (load them all before the clock starts)
    conn.abort()
    go()
    retries = 0
    start = shared_clock()
    for i in range(commits):
        item = mine[i % CONTENDED_OBJECTS]
        while True:
            try:
                item.value += 1
                conn.commit()
                break
            except ConflictError:
                conn.abort()
                retries += 1
    end = shared_clock()
    conn.storage.close()
    return {"start": start, "end": end, "retries": retries}


def w5_counters(path):
    """Every W5 counter's value, in order."""
    conn = _connect(path)
    counters = [item.value for item in conn.get_root()["items"]]
    conn.storage.close()
    return {"counters": counters}


def w7(path, source, mib):
    """Store `mib` MiB as a bytes attribute with one commit, then read it after reopening."""
    size = mib * MIB
    conn = _connect(path)
    start = clock()
    with open(source, "rb") as f:
        conn.get_root()["payload"] = Payload(f.read())
    conn.commit()
    written = clock() - start
    conn.storage.close()
    conn = _connect(path)
    start = clock()
    data = conn.get_root()["payload"].data
    elapsed = clock() - start
    expect(len(data) == size, "W7 read %d bytes, not %d" % (len(data), size))
    with open(source, "rb") as f:
        expect(f.read() == data, "W7 read back different bytes")
    conn.storage.close()
    return {"write_mib_s": mib / written, "read_mib_s": mib / elapsed}
