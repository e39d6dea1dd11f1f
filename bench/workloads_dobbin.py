"""The workloads, written for Dobbin.

Same functions, same arguments and same results as `workloads_zodb` and
`workloads_durus`; see `bench.spec` for the shape and sizes.  The root
is a `PersistentDict` holding the objects under test, and every change
goes through `checkout` and a `transaction` commit, as an application
does it.
"""


import transaction

from bench.spec import (CONTENDED_OBJECTS, CYCLED_ITEMS, MIB, WRITERS, clock, expect,
                        item_fields, peak_rss_mib, shared_clock, touch)
from dobbin.btree import OOBTree
from dobbin.database import Database
from dobbin.persistent import Persistent, PersistentDict, PersistentFile, checkout

SYSTEM = "dobbin"


class Item(Persistent):
    """The benchmark object: a short name, an int value, three short tags."""

    def __init__(self, name, value, tags):
        self.name = name
        self.value = value
        self.tags = tags


class Payload(Persistent):
    """Holds W7's stored file."""

    def __init__(self, data):
        self.data = data


def _new_root(db, **items):
    root = PersistentDict(items)
    db.elect(root)
    transaction.commit()
    return root


def _cycled_items(path, count, durability="fsync"):
    db = Database(path, durability=durability)
    if db.root is None:
        _new_root(db, items=[Item(*item_fields(i)) for i in range(count)])
    return db, db.root["items"]


def w1(path, commits, durability="fsync"):
    """Small commits: each changes one of 100 items' value."""
    db, items = _cycled_items(path, CYCLED_ITEMS, durability)
    before = sum(item.value for item in items)
    start = clock()
    for i in range(commits):
        item = items[i % CYCLED_ITEMS]
        checkout(item)
        item.value += 1
        transaction.commit()
    elapsed = clock() - start
    expect(sum(item.value for item in items) == before + commits, "W1 lost commits")
    db.close()
    return {"commits_per_s": commits / elapsed}


def w2(path, objects):
    """One commit of `objects` new items inserted into the B-tree."""
    db = Database(path)
    _new_root(db, tree=OOBTree())
    tree = db.root["tree"]
    start = clock()
    for i in range(objects):
        tree[i] = Item(*item_fields(i))
    transaction.commit()
    elapsed = clock() - start
    expect(len(tree) == objects, "W2 stored %d items, not %d" % (len(tree), objects))
    db.close()
    return {"objects_per_s": objects / elapsed}


def _open(path, name, cache_size=None):
    kwargs = {} if cache_size is None else {"cache_size": cache_size}
    start = clock()
    db = Database(path, **kwargs)
    container = db.root[name]
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
    """A file of `transactions` small commits (W1's workload)."""
    w1(path, transactions)
    return {}


def w4(path):
    """In a fresh process: open a file of many transactions (no sidecar files exist)."""
    db, items, opened = _open(path, "items")
    expect(len(items) == CYCLED_ITEMS, "W4 found %d items" % len(items))
    db.close()
    return {"open_ms": opened * 1000}


def w5_setup(path):
    """The counters both W5 writers use: WRITERS x CONTENDED_OBJECTS items at 0."""
    db = Database(path)
    _new_root(db, items=[Item("counter%d" % i, 0, []) for i in range(WRITERS * CONTENDED_OBJECTS)])
    db.close()
    return {}


def w5_worker(target, writer, commits, shared, go):
    """One W5 process: `commits` increments, retried on conflict, with its own Database."""
    db = Database(target)
    items = db.root["items"]
    first = 0 if shared else writer * CONTENDED_OBJECTS
    mine = items[first:first + CONTENDED_OBJECTS]
    transaction.abort()
    go()
    turns = 0
    start = shared_clock()
    for i in range(commits):
        item = mine[i % CONTENDED_OBJECTS]
        for attempt in transaction.manager.attempts(10_000):
            turns += 1
            with attempt:
                checkout(item)
                item.value += 1
    end = shared_clock()
    db.close()
    return {"start": start, "end": end, "retries": turns - commits}


def w5_counters(path):
    """Every W5 counter's value, in order."""
    db = Database(path)
    counters = [item.value for item in db.root["items"]]
    db.close()
    return {"counters": counters}


def w7(path, source, mib):
    """Store a file of `mib` MiB with one commit, then read it back after reopening."""
    size = mib * MIB
    db = Database(path)
    root = _new_root(db)
    start = clock()
    with open(source, "rb") as f:
        payload = Payload(PersistentFile(f))
        checkout(root)
        root["payload"] = payload
        transaction.commit()
    written = clock() - start
    db.close()
    db = Database(path)
    stream = db.root["payload"].data
    start = clock()
    read = 0
    for chunk in stream:
        read += len(chunk)
        last = chunk
    elapsed = clock() - start
    expect(read == size, "W7 read %d bytes, not %d" % (read, size))
    with open(source, "rb") as f:
        f.seek(size - len(last))
        expect(f.read() == last, "W7 read back different bytes")
    db.close()
    return {"write_mib_s": mib / written, "read_mib_s": mib / elapsed}
