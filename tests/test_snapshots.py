"""broker.snapshots: states, B-trees and object graphs as of a transaction."""

import pytest
import transaction

from zope.interface.verify import verifyObject

from broker.codec import ABSENT
from broker.export import ExportRegistry, live_contents, visible_instances
from broker.interfaces import ISnapshot
from broker.snapshots import Snapshot, TreeView, tree_lookup
from dobbin.btree import OOBTree
from dobbin.persistent import Persistent, PersistentDict, checkout

OLD_ITEMS = [("k%03d" % n, n) for n in range(200)]


class Gone(Exception):
    """What the tests' snapshots raise for an object they cannot read."""

    def __init__(self, obj):
        super().__init__(obj._p_oid)
        self.obj = obj


class Thing(Persistent):
    def __init__(self, name):
        self.name = name


class Catalog(Persistent):
    """A mapping of neither kind the snapshots read through their states."""

    def __init__(self):
        self.entries = {}

    def keys(self):
        return self.entries.keys()

    def values(self):
        return self.entries.values()

    def items(self):
        return self.entries.items()

    def __getitem__(self, key):
        return self.entries[key]

    def __len__(self):
        return len(self.entries)

    def __contains__(self, key):
        return key in self.entries

    def __iter__(self):
        return iter(self.entries)


@pytest.fixture
def tree_db(open_db):
    """(db, its root's B-tree of OLD_ITEMS in several buckets, the tid they were committed at)."""
    db = open_db(durability="none")
    root = PersistentDict()
    checkout(root)
    root["tree"] = OOBTree(OLD_ITEMS)
    db.elect(root)
    transaction.commit()
    return db, db.root["tree"], db.last_tid


def counting_loads(db, monkeypatch):
    loads = []
    load_state = db.load_state

    def counting(oid, tid=None):
        loads.append(oid)
        return load_state(oid, tid)

    monkeypatch.setattr(db, "load_state", counting)
    return loads


def read_all(snapshot, tree):
    view = TreeView(snapshot, tree)
    return snapshot.run(lambda: (len(view), list(view.items())))


def test_implements_its_interface(tree_db):
    db, _tree, tid = tree_db
    assert verifyObject(ISnapshot, Snapshot(db, tid, Gone))


def test_an_unchanged_tree_is_read_live_without_loading_a_version(tree_db, monkeypatch):
    db, tree, tid = tree_db
    loads = counting_loads(db, monkeypatch)
    snapshot = Snapshot(db, tid, Gone)
    assert read_all(snapshot, tree) == (200, OLD_ITEMS)
    value, path = snapshot.run(lambda: tree_lookup(snapshot, tree, "k150"))
    assert value == 150 and path[0] is tree and len(path) >= 3
    assert tree_lookup(snapshot, tree, "k150x")[0] is ABSENT
    assert loads == []


def test_a_tree_changed_after_the_snapshot_is_read_from_its_versions(tree_db):
    db, tree, tid = tree_db
    transaction.begin()
    tree.update(("k%03d" % n, -n) for n in range(2000))  # every bucket changed, and split
    del tree["k007"]
    transaction.commit()
    snapshot = Snapshot(db, tid, Gone)
    assert read_all(snapshot, tree) == (200, OLD_ITEMS)
    assert tree.get("k007") is None and tree["k150"] == -150
    for key, old in [("k007", 7), ("k150", 150), ("k500", ABSENT)]:
        assert snapshot.run(lambda: tree_lookup(snapshot, tree, key))[0] == old
    assert tree._p_oid in snapshot.oids()
    with pytest.raises(Gone) as caught:
        read_all(Snapshot(db, 0, Gone), tree)  # before it existed
    assert caught.value.obj is tree


def test_a_commit_landing_while_a_tree_is_read_is_read_around(tree_db, start_thread):
    db, tree, tid = tree_db
    snapshot = Snapshot(db, tid, Gone)
    view = TreeView(snapshot, tree)
    passes = []

    def change():
        transaction.begin()
        tree["k150"] = "changed"
        transaction.commit()

    def read():
        items = iter(view.items())
        first = [next(items) for _ in range(10)]
        if not passes:
            start_thread(change).join()  # after the first bucket, before the one changed
        passes.append(True)
        return first + list(items)

    assert snapshot.run(read) == OLD_ITEMS and len(passes) == 2


def test_an_error_from_a_torn_read_is_read_again_and_a_sound_one_raised(tree_db):
    db, tree, tid = tree_db
    calls = []

    def read():
        calls.append(True)
        result = list(TreeView(snapshot, tree).items())
        if len(calls) == 1:
            raise IndexError("as a read of half a split may")
        return result

    snapshot = Snapshot(db, tid, Gone)
    with pytest.raises(IndexError):  # nothing had changed: the error stands
        snapshot.run(read)
    transaction.begin()
    tree["k000"] = "changed"
    transaction.commit()
    calls.clear()
    snapshot = Snapshot(db, tid, Gone)
    assert snapshot.run(read) == OLD_ITEMS and len(calls) == 2


def test_a_mapping_of_another_kind_is_read_live_unless_it_changed(open_db):
    db = open_db(durability="none")
    root = Catalog()
    checkout(root)
    root.entries["a"] = 1
    db.elect(root)
    transaction.commit()
    tid = db.last_tid
    snapshot = Snapshot(db, tid, Gone)
    assert snapshot.run(lambda: dict(snapshot.mapping(root).items())) == {"a": 1}
    assert snapshot.oids() == [root._p_oid]
    checkout(root)
    root.entries["b"] = 2
    transaction.commit()
    snapshot = Snapshot(db, tid, Gone)
    with pytest.raises(Gone):
        snapshot.run(lambda: dict(snapshot.mapping(root).items()))


def test_a_mapping_of_another_kind_holding_a_list_that_holds_itself_is_read(open_db):
    # A client may store such a list as an item: the walk of the mapping's
    # parts went round it for ever, in the server's front thread.
    db = open_db(durability="none")
    root = Catalog()
    checkout(root)
    loop = []
    loop.append(loop)
    root.entries["loop"] = loop
    root.entries["thing"] = Thing("a value, not a part")
    root.spare = [loop, (loop, {"again": loop})]
    db.elect(root)
    transaction.commit()
    snapshot = Snapshot(db, db.last_tid, Gone)
    items = snapshot.run(lambda: dict(snapshot.mapping(root).items()))
    assert items["loop"][0] is items["loop"] and snapshot.oids() == [root._p_oid]


def test_an_object_graph_is_walked_as_of_the_snapshot(open_db):
    db = open_db(durability="none")
    registry = ExportRegistry()
    registry.export_class(Thing)
    root = PersistentDict()
    checkout(root)
    root["tree"] = OOBTree({"a": Thing("in a tree")})
    root["b"] = Thing("in the root")
    db.elect(root)
    transaction.commit()
    tid = db.last_tid
    checkout(root)
    del root["b"]
    root["tree"]["c"] = Thing("new")
    del root["tree"]["a"]
    transaction.commit()

    def names(snapshot, contents):
        return snapshot.run(lambda: sorted(thing.name for thing in visible_instances(
            db.root, Thing, registry, 100, contents)))

    snapshot = Snapshot(db, tid, Gone)
    assert names(snapshot, snapshot.contents) == ["in a tree", "in the root"]
    later = Snapshot(db, db.last_tid, Gone)
    assert names(later, later.contents) == names(later, live_contents) == ["new"]
