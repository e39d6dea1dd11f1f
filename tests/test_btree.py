"""Tests of dobbin.btree: structure, ranges, a model-based random test,
persistence through a real Database, conflict resolution (unit, across
threads, and across two real processes)."""

import collections
import copy
import datetime
import decimal
import multiprocessing
import random
import shutil
import tempfile
import threading
import time
import traceback

import pytest
import transaction
from hypothesis import settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 rule)

from dobbin.btree import Bucket, Length, Node, OOBTree, RangeView
from dobbin.database import Database
from dobbin.exc import ConflictError, ObjectGraphError
from dobbin.persistent import PersistentDict, checked_out, checkout
from dobbin.session import KeepPersistent

from btree_fixtures import (SmallTree, check_invariants, grown, in_other_thread, leaf_for,
                            stored, tree_depth)


@pytest.fixture(autouse=True)
def clean_transaction():
    transaction.abort()
    yield
    transaction.abort()


@pytest.fixture
def db(tmp_path):
    database = Database(str(tmp_path / "btree.dobbin"), durability="none")
    yield database
    transaction.abort()
    database.close()


# -- pure structure ---------------------------------------------------------

def test_empty_tree():
    tree = OOBTree()
    assert len(tree) == 0
    assert not tree
    assert list(tree) == [] and list(tree.items()) == []
    assert tree.get("a") is None and "a" not in tree
    with pytest.raises(KeyError):
        tree["a"]
    with pytest.raises(KeyError):
        del tree["a"]
    with pytest.raises(KeyError):
        tree.popitem()
    with pytest.raises(ValueError):
        tree.minKey()
    with pytest.raises(ValueError):
        tree.maxKey()
    check_invariants(tree)


def test_constructor_and_overwrite():
    tree = SmallTree((k, k) for k in range(20))
    check_invariants(tree)
    tree[5] = "five"
    assert len(tree) == 20 and tree[5] == "five"
    check_invariants(tree)


def test_clear_after_inserts_in_one_transaction(db):
    tree = stored(db, SmallTree((k, k) for k in range(30)))
    for key in range(30, 60):
        tree[key] = key
    tree.clear()
    check_invariants(tree, allow_empty=True)
    transaction.commit()
    assert len(tree) == 0 and list(tree) == []
    tree.update((k, k) for k in range(10))
    transaction.commit()
    old_length = tree._length
    tree.clear()  # nothing new and changed: drops the buckets whole
    transaction.commit()
    assert len(tree) == 0 and isinstance(tree._root, Bucket)
    assert tree._length is old_length and old_length.cleared == 1


def test_lookup_path_is_the_tree_its_nodes_down_and_the_key_s_bucket():
    tree = SmallTree((k, k) for k in range(60))
    for key in (0, 31, 59, 1000):
        path = tree.lookup_path(key)
        assert path[0] is tree and path[-1] is leaf_for(tree, key)
        assert len(path) == tree_depth(tree) + 2
        assert all(isinstance(node, Node) for node in path[1:-1])
        assert path[1] is tree._root
    with pytest.raises(TypeError):
        tree.lookup_path("not an int")


def test_ranges():
    tree = SmallTree((k, -k) for k in range(0, 100, 2))
    assert list(tree.keys(10, 20)) == [10, 12, 14, 16, 18, 20]
    assert list(tree.keys(10, 20, excludemin=True)) == [12, 14, 16, 18, 20]
    assert list(tree.keys(10, 20, excludemax=True)) == [10, 12, 14, 16, 18]
    assert list(tree.keys(10, 20, True, True)) == [12, 14, 16, 18]
    assert list(tree.keys(9, 13)) == [10, 12]
    assert list(tree.keys(min=95)) == [96, 98]
    assert list(tree.keys(max=3)) == [0, 2]
    assert list(tree.keys(-10, -1)) == [] and list(tree.keys(99, 200)) == []
    assert list(tree.keys(20, 10)) == []
    assert list(tree.keys(10, 10)) == [10]
    assert list(tree.keys(10, 10, excludemax=True)) == []
    assert list(tree.values(4, 8)) == [-4, -6, -8]
    assert list(tree.items(4, 6)) == [(4, -4), (6, -6)]
    view = tree.keys(10, 20)
    assert isinstance(view, RangeView)
    assert len(view) == 6 and list(view) == list(view)
    assert 12 in view and 13 not in view and 22 not in view
    assert 10 not in tree.keys(10, 20, excludemin=True)
    assert (12, -12) in tree.items(10, 20)
    assert len(tree.keys()) == len(tree) == 50


def test_an_excluded_bound_of_none_leaves_the_smallest_or_largest_key_out():
    tree = SmallTree((k, -k) for k in range(0, 100, 2))
    assert list(tree.keys(excludemin=True))[:2] == [2, 4]
    assert list(tree.keys(excludemax=True))[-2:] == [94, 96]
    assert list(tree.keys(max=6, excludemin=True)) == [2, 4, 6]
    assert list(reversed(tree.keys(excludemin=True, excludemax=True)))[::47] == [96, 2]
    assert len(tree.keys(excludemin=True, excludemax=True)) == 48
    assert 0 not in tree.keys(excludemin=True) and 98 not in tree.items(excludemax=True)
    view = tree.keys(excludemin=True)
    tree[-2] = 2  # a view reflects the tree as it is when read
    assert list(view)[:2] == [0, 2]
    assert list(SmallTree().keys(excludemin=True, excludemax=True)) == []


@pytest.mark.parametrize("change", ["insert", "delete"])
@pytest.mark.parametrize("backwards", [False, True])
def test_changing_the_size_while_iterating_raises_instead_of_skipping(change, backwards):
    tree = OOBTree((k, k) for k in range(0, 40, 2))  # one bucket, and no split below
    tree[0] = "changed"  # iterated, the bucket is this transaction's copy: changed in place
    seen = []
    with pytest.raises(RuntimeError, match="changed size during iteration"):
        for key in reversed(tree) if backwards else tree:
            seen.append(key)
            if change == "insert":  # a key not yet reached: it would shift the rest
                tree[key + (-1 if backwards else 1)] = "new"
            else:
                del tree[key]
    assert len(seen) == len(set(seen)) == 1
    transaction.abort()


def test_min_and_max_key():
    tree = SmallTree((k, k) for k in range(10, 50, 5))
    assert tree.minKey() == 10 and tree.maxKey() == 45
    assert tree.minKey(11) == 15 and tree.minKey(15) == 15
    assert tree.maxKey(44) == 40 and tree.maxKey(45) == 45
    assert tree.maxKey(1000) == 45 and tree.minKey(-5) == 10
    with pytest.raises(ValueError):
        tree.minKey(46)
    with pytest.raises(ValueError):
        tree.maxKey(9)


def test_reversed_goes_by_keys_not_by_position(db):
    # Without __reversed__, reversed() indexed the tree by 0..len-1.
    tree = grown(db, SmallTree(), ((name, len(name)) for name in ("ann", "bo", "cy", "dee")))
    assert list(reversed(tree)) == ["dee", "cy", "bo", "ann"]
    assert list(reversed(tree.items("b", "d"))) == [("cy", 2), ("bo", 2)]
    assert list(reversed(tree.values(excludemax=True, max="dee"))) == [2, 2, 3]
    numbered = stored(db, SmallTree((k, -k) for k in range(30)))
    assert list(reversed(numbered)) == list(range(29, -1, -1))
    assert list(reversed(stored(db, SmallTree()))) == []


def test_mapping_api():
    tree = SmallTree()
    assert tree.setdefault("b", 2) == 2 and tree.setdefault("b", 3) == 2
    tree.update({"a": 1, "c": 3}, d=4)
    tree.update([("e", 5)])
    assert list(tree.items()) == [("a", 1), ("b", 2), ("c", 3), ("d", 4),
                                  ("e", 5)]
    tree.update(other=6, self=7)  # names of parameters: items all the same
    assert tree.pop("other") == 6 and tree.pop("self") == 7
    assert tree.pop("a") == 1 and tree.pop("a", None) is None
    with pytest.raises(KeyError):
        tree.pop("a")
    assert tree.popitem() == ("b", 2)
    assert tree == {"c": 3, "d": 4, "e": 5}
    assert tree != {"c": 3, "d": 4, "e": 6}
    assert tree != {"c": 3, "d": 4}
    assert tree == SmallTree({"c": 3, "d": 4, "e": 5})
    assert tree != SmallTree({"c": 3, "d": 4, "x": 5})
    assert (tree == [1, 2]) is False
    tree.update(tree)
    assert len(tree) == 3
    tree.clear()
    assert len(tree) == 0 and list(tree) == []
    check_invariants(tree, allow_empty=True)
    with pytest.raises(TypeError):
        hash(tree)


@pytest.mark.parametrize("bad", [None, float("nan"), decimal.Decimal("NaN"), object(), {}, 1j, [1],
                                 (1, [2]), {3}, frozenset({3})])
def test_unorderable_or_mutable_keys_refused(bad):
    tree = SmallTree((k, k) for k in range(10))
    with pytest.raises(TypeError):
        tree[bad] = 1
    assert len(tree) == 10
    check_invariants(tree)


Pair = collections.namedtuple("Pair", "name score")


@pytest.mark.parametrize("bad", [("a", float("nan")), ("a", (float("nan"),)),
                                 ("a", frozenset({1})), ("a", decimal.Decimal("NaN")),
                                 Pair("a", float("nan")), ("a", Pair("b", frozenset({1}))),
                                 Pair("a", decimal.Decimal("NaN"))])
def test_keys_unordered_inside_a_tuple_refused(bad):
    # A NaN compares false both ways: inside a tuple key it passed for
    # equal to a neighbour and overwrote that key's value.
    tree = SmallTree(((name, float(n)), n) for n, name in enumerate("abcdefgh"))
    with pytest.raises(TypeError, match="totally ordered"):
        tree[bad] = "bad"
    with pytest.raises(TypeError, match="totally ordered"):
        tree.get(bad)
    assert dict(tree.items()) == {(name, float(n)): n for n, name in enumerate("abcdefgh")}
    check_invariants(tree)


@pytest.mark.parametrize("use", [
    lambda tree: list(tree.keys(min="a")), lambda tree: list(tree.keys(max="a")),
    lambda tree: list(tree.keys(5, "a")), lambda tree: list(reversed(tree.keys(max="a"))),
    lambda tree: list(reversed(tree.keys(min="a"))), lambda tree: "a" in tree.keys(0, 5),
    lambda tree: 3 in tree.keys("a")])
def test_a_range_bound_or_member_of_another_type_is_named_in_the_error(use):
    # A bare "'<' not supported" came out of bisect, in a tree of one bucket.
    tree = OOBTree((k, k) for k in range(10))
    with pytest.raises(TypeError, match="'a' \\(str\\) cannot be compared with the|"
                                        "3 \\(int\\) cannot be compared with the bounds"):
        use(tree)


def test_mixed_key_types_refused_without_damage():
    tree = SmallTree((k, k) for k in range(30))
    for bad in ("x", (1,), b"x"):
        with pytest.raises(TypeError, match="cannot be compared"):
            tree[bad] = 1
        with pytest.raises(TypeError):
            tree.get(bad)
        with pytest.raises(TypeError):
            del tree[bad]
    assert list(tree) == list(range(30))
    check_invariants(tree)
    tree[2.5] = "ints and floats do compare"
    assert tree.minKey(2.1) == 2.5


# -- model-based random testing ---------------------------------------------

class TreeMachine(RuleBasedStateMachine):
    """Random operations on a stored SmallTree, mirrored on a dict."""

    keys = st.integers(min_value=0, max_value=120)

    @initialize()
    def start(self):
        transaction.abort()
        self.directory = tempfile.mkdtemp()
        self.db = Database(self.directory + "/machine.dobbin",
                           durability="none")
        self.tree = stored(self.db, SmallTree())
        self.model = {}

    @rule(key=keys, value=st.integers())
    def set(self, key, value):
        self.tree[key] = value
        self.model[key] = value

    @rule(key=keys)
    def delete(self, key):
        if key in self.model:
            del self.tree[key]
            del self.model[key]
        else:
            with pytest.raises(KeyError):
                del self.tree[key]

    @rule(key=keys)
    def get(self, key):
        assert self.tree.get(key, "missing") == self.model.get(key, "missing")
        assert (key in self.tree) == (key in self.model)

    @rule(low=st.none() | keys, high=st.none() | keys,
          excludemin=st.booleans(), excludemax=st.booleans())
    def range(self, low, high, excludemin, excludemax):
        expected = [
            (k, v) for k, v in sorted(self.model.items())
            if (low is None or k > low or (k == low and not excludemin))
            and (high is None or k < high or (k == high and not excludemax))]
        # As in BTrees: an excluded bound of None leaves the smallest
        # (largest) key out.
        left_out = set()
        if low is None and excludemin and self.model:
            left_out.add(min(self.model))
        if high is None and excludemax and self.model:
            left_out.add(max(self.model))
        expected = [(k, v) for k, v in expected if k not in left_out]
        view = self.tree.items(low, high, excludemin, excludemax)
        assert list(view) == expected
        assert len(view) == len(expected)
        assert list(reversed(view)) == expected[::-1]
        assert list(reversed(self.tree.keys(low, high, excludemin, excludemax))) \
            == [k for k, _ in reversed(expected)]

    @rule()
    def reverse(self):
        assert list(reversed(self.tree)) == sorted(self.model, reverse=True)
        assert list(reversed(self.tree.values())) == [
            self.model[k] for k in sorted(self.model, reverse=True)]

    @rule(key=keys)
    def max_key(self, key):
        below = [k for k in self.model if k <= key]
        if below:
            assert self.tree.maxKey(key) == max(below)
        else:
            with pytest.raises(ValueError):
                self.tree.maxKey(key)

    @rule(start=keys, count=st.integers(min_value=1, max_value=12))
    def set_in_key_order(self, start, count):
        # Key after key: inserts that skip the walk from the root.
        for key in range(start, start + count):
            self.tree[key] = -key
            self.model[key] = -key

    @rule()
    def clear(self):
        self.tree.clear()
        self.model.clear()

    @rule()
    def popitem(self):
        if self.model:
            key = min(self.model)
            assert self.tree.popitem() == (key, self.model.pop(key))

    @rule()
    def commit(self):
        transaction.commit()

    @rule()
    def abort(self):
        transaction.abort()
        self.model = dict(self.tree.items())

    @invariant()
    def structure(self):
        check_invariants(self.tree, allow_empty=True)
        assert len(self.tree) == len(self.model)
        assert list(self.tree.items()) == sorted(self.model.items())
        if self.model:
            assert self.tree.minKey() == min(self.model)
            assert self.tree.maxKey() == max(self.model)

    def teardown(self):
        transaction.abort()
        self.db.close()
        shutil.rmtree(self.directory, ignore_errors=True)


TreeMachine.TestCase.settings = settings(max_examples=60,
                                         stateful_step_count=80,
                                         deadline=None)
test_tree_against_dict_model = TreeMachine.TestCase


# -- persistence --------------------------------------------------------------

def test_round_trip_through_a_database_file(tmp_path):
    path = str(tmp_path / "round.dobbin")
    rng = random.Random(3)
    model = {rng.randrange(10 ** 6): rng.random() for _ in range(3000)}
    with Database(path) as first:
        tree = stored(first, OOBTree(model))
        assert tree_depth(tree) >= 1
    with Database(path) as second:
        tree = second.root
        assert isinstance(tree, OOBTree) and tree == model
        assert list(tree.items()) == sorted(model.items())
        check_invariants(tree)
        for key in list(model)[:2000]:
            del tree[key]
            del model[key]
        tree[-1] = "new"
        model[-1] = "new"
        transaction.commit()
    with Database(path) as third:
        tree = third.root
        assert tree == model and len(tree) == len(model)
        check_invariants(tree)


def test_values_and_items_load_each_leafs_values_together(tmp_path):
    path = str(tmp_path / "prefetch.dobbin")
    with Database(path) as first:
        tree = stored(first, SmallTree())
        for key in range(12):
            tree[key] = Length(key)
        transaction.commit()
    with Database(path) as second:
        tree = second.root

        def ghosts(key):
            return [object.__getattribute__(value, "_p_ghost")
                    for value in leaf_for(tree, key).values]

        assert list(tree.keys()) == list(range(12))
        assert all(ghosts(0)) and all(ghosts(11))  # keys alone load no value
        for view in (tree.items(), tree.values()):
            next(iter(view))
            assert not any(ghosts(0))  # the first leaf's values came in together...
            assert all(ghosts(11))     # ...and no other leaf's
        assert [value.value for value in tree.values()] == list(range(12))


def test_removing_an_absent_key_checks_nothing_out(db):
    tree = stored(db, SmallTree((k, k) for k in range(0, 40, 2)))
    bucket = leaf_for(tree, 21)
    assert tree.pop(21, "absent") == "absent"
    with pytest.raises(KeyError):
        del tree[21]
    assert not checked_out(bucket) and not checked_out(tree._length)
    assert tree.pop(20) == 20 and checked_out(bucket)  # present: it changes


def test_a_change_rewrites_one_bucket(db):
    tree = stored(db, OOBTree((k, k) for k in range(5000)))
    changed = []
    db.subscribe(lambda tid, oids: changed.append(oids))
    bucket = leaf_for(tree, 2500)
    tree[2500] = "new value"
    transaction.commit()
    assert changed[-1] == {bucket._p_oid}
    tree[2500.5] = "new key"
    transaction.commit()
    assert changed[-1] == {bucket._p_oid, tree._length._p_oid}
    assert len(db) > 80  # thousands of items, yet two small records


# -- conflict resolution, unit ---------------------------------------------

def commit_in_another_thread_at_checkout(monkeypatch, db, change, at_call):
    """Make the calling thread's `at_call`th bucket checkout wait for
    `change` (of the root tree), committed meanwhile by another thread."""
    caller = threading.get_ident()
    original = OOBTree._writable_bucket
    calls = []

    def writable_bucket(tree, key, *args, **kwargs):
        if threading.get_ident() == caller:
            calls.append(key)
            if len(calls) == at_call:
                def commit():
                    transaction.begin()
                    change(db.root)
                    transaction.commit()

                thread = threading.Thread(target=commit)
                thread.start()
                thread.join()
        return original(tree, key, *args, **kwargs)

    monkeypatch.setattr(OOBTree, "_writable_bucket", writable_bucket)


@pytest.mark.parametrize("call, change, at_call, result, after", [
    (lambda t: t.setdefault("k", "ours"), lambda t: t.__setitem__("k", "theirs"), 1,
     "theirs", {"a": "first", "p": "old", "k": "theirs"}),
    (lambda t: t.pop("p"), lambda t: t.__setitem__("p", "newer"), 1,
     "newer", {"a": "first"}),
    (lambda t: t.pop("p", None), lambda t: t.__delitem__("p"), 1, None, {"a": "first"}),
    (lambda t: t.popitem(), lambda t: t.__delitem__("a"), 1, ("p", "old"), {}),
], ids=["setdefault", "pop", "pop-default", "popitem"])
def test_a_read_then_write_call_decides_on_the_state_it_changes(db, monkeypatch, call, change,
                                                                at_call, result, after):
    # These once decided on a read made before checking the bucket out: a
    # commit landing in between was overwritten (setdefault) or its value
    # lost (pop), or they raised KeyError (pop with a default, popitem).
    tree = stored(db, OOBTree({"a": "first", "p": "old"}))
    transaction.begin()
    commit_in_another_thread_at_checkout(monkeypatch, db, change, at_call)
    assert call(tree) == result
    transaction.commit()
    assert dict(tree.items()) == after and len(tree) == len(after)
    check_invariants(tree)


def test_clearing_key_by_key_while_another_commit_removes_a_key(db, monkeypatch):
    tree = stored(db, SmallTree(dict.fromkeys(range(12), "v")))
    transaction.begin()
    # At the first removal: another commit removes a key of a later bucket.
    commit_in_another_thread_at_checkout(monkeypatch, db, lambda t: t.__delitem__(5), 2)
    tree[100] = "ours"  # the tree's size changed: clear() removes key by key
    tree.clear()  # once: KeyError 5
    transaction.commit()
    assert dict(tree.items()) == {} and len(tree) == 0
    check_invariants(tree, allow_empty=True)


@pytest.mark.parametrize("count", [0, 1, 3, 4, 5, 17, 100, 1000])
def test_a_tree_built_from_items_is_whole_in_every_thread_and_transaction(count):
    # Built by inserts, its items were one thread's checkouts: an abort
    # emptied it, and other threads saw it empty.
    items = {k: -k for k in range(count, 0, -1)}
    tree = SmallTree(items)
    assert not any(checked_out(leaf) for leaf in check_invariants(tree, allow_empty=True))
    transaction.abort()
    seen = []
    in_other_thread(lambda: seen.append(dict(tree.items())))
    assert seen == [items] and dict(tree.items()) == items and len(tree) == count
    tree.update((k, k) for k in range(count, count + 40))  # grows as any tree
    del tree[count + 1]
    check_invariants(tree)
    transaction.abort()


def test_a_tree_built_from_items_takes_what_update_takes():
    assert dict(OOBTree([(2, "a"), (1, "b"), (2, "c")]).items()) == {1: "b", 2: "c"}
    assert list(OOBTree(OOBTree({"x": 1, "w": 2}))) == ["w", "x"]
    with pytest.raises(TypeError, match="may not be None"):
        OOBTree({None: 1})
    with pytest.raises(TypeError, match="mutually comparable"):
        OOBTree({1: 1, "a": 2})


def test_a_scratch_tree_built_from_items_joins_no_transaction(db):
    tree = stored(db, OOBTree({"a": 1}))
    assert tree == OOBTree({"a": 1})  # a scratch tree, never stored
    tree["b"] = 2
    transaction.commit()  # failed: the scratch tree's checkouts were unreachable
    assert dict(tree.items()) == {"a": 1, "b": 2}


def test_a_scratch_tree_filled_by_inserts_stays_out_of_the_commit(db):
    # Its inserts check its new pieces out: an unreachable checkout failed
    # the commit, even in a thread that had touched no database.
    root = stored(db, PersistentDict())
    scratch = SmallTree()
    for key in range(40):  # splits: new buckets, nodes and a new root
        scratch[key] = -key
    checkout(root)
    root["smallest"] = scratch.minKey()
    objects = len(db)
    transaction.commit()
    assert db.root["smallest"] == 0 and len(db) == objects
    assert scratch._p_oid is None and list(scratch.items()) == [(k, -k) for k in range(40)]
    check_invariants(scratch)
    scratch[40] = -40
    transaction.abort()  # changes since are undone, like any transaction's
    assert 40 not in scratch and len(scratch) == 40

    done = []

    def no_database():
        tree = OOBTree()
        tree[2], tree[1] = "b", "a"
        transaction.commit()
        done.append(list(tree.items()))
    in_other_thread(no_database)
    assert done == [[(1, "a"), (2, "b")]]


def test_threads_changing_one_scratch_tree_conflict_instead_of_losing_keys():
    # Each thread's changes are its own until it commits: the second one's
    # copies predate the first one's commit, and installing them lost keys.
    tree = SmallTree({0: 0, 2: 2, 4: 4, 6: 6})
    first_changed, second_changed, first_done = (threading.Event() for _ in range(3))
    conflicts = []

    def first():
        tree[1] = tree[3] = "first"  # the bucket splits
        first_changed.set()
        second_changed.wait(30)
        transaction.commit()
        first_done.set()

    def second():
        first_changed.wait(30)
        tree[5] = "second"
        second_changed.set()
        first_done.wait(30)
        try:
            transaction.commit()
        except ConflictError as conflict:
            conflicts.append(str(conflict))
            transaction.abort()
        for attempt in transaction.manager.attempts():
            with attempt:
                tree[5] = "second"
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert conflicts and "changes to the never-stored Bucket" in conflicts[0]
    assert list(tree.items()) == [(0, 0), (1, "first"), (2, 2), (3, "first"), (4, 4),
                                  (5, "second"), (6, 6)]
    assert len(tree) == 7
    check_invariants(tree)


def test_a_scratch_tree_is_claimed_from_a_commit_s_vote_to_its_end():
    # Both threads' copies are current until one installs them: the
    # second to vote must not go on to install its own over the first's.
    tree = SmallTree({0: 0, 2: 2})
    voted, conflicts = threading.Event(), []

    class SlowVoter:
        """A data manager voting after the session, while another thread commits."""
        transaction_manager = transaction.manager

        def sortKey(self):
            return "~after the session"
        abort = commit = tpc_begin = tpc_finish = tpc_abort = lambda self, txn: None

        def tpc_vote(self, txn):
            voted.set()
            other.join(30)

    def second():
        voted.wait(30)
        tree[3] = "second"
        try:
            transaction.commit()
        except ConflictError as conflict:
            conflicts.append(str(conflict))
            transaction.abort()
    other = threading.Thread(target=second)
    other.start()
    tree[1] = "first"
    transaction.get().join(SlowVoter())
    transaction.commit()
    assert conflicts and "never-stored" in conflicts[0]
    assert list(tree.items()) == [(0, 0), (1, "first"), (2, 2)]
    tree[3] = "first, later"  # the claims ended with the commits
    transaction.commit()
    assert tree[3] == "first, later"


def test_a_lookup_through_a_copy_another_commit_made_stale_says_to_retry(db):
    tree = stored(db, SmallTree())
    tree.update({1: 1, 3: 3, 5: 5, 7: 7, 9: 9})  # [1, 3] | [5, 7, 9]
    transaction.commit()
    tree[0] = "ours"  # our copy of [1, 3] links on to [5, 7, 9]
    in_other_thread(lambda: [tree.pop(key) for key in (3, 5, 7, 9)])  # unlinked
    with pytest.raises(ConflictError, match="no consistent path to key 6 .* must be retried"):
        tree.get(6)
    transaction.abort()
    assert tree.get(6) is None and list(tree) == [1]


def test_an_object_checked_out_by_hand_and_left_unconnected_still_fails_the_commit(db):
    root = stored(db, PersistentDict())
    scratch, forgotten = OOBTree({1: 1}), PersistentDict()
    scratch[2] = 2
    checkout(forgotten)
    checkout(root)
    root["x"] = 1
    with pytest.raises(ObjectGraphError):
        transaction.commit()
    transaction.abort()
    assert "x" not in db.root and dict(scratch.items()) == {1: 1}


def state(pairs, next=None, high=None):
    pairs = sorted(pairs)
    return {"keys": [k for k, _ in pairs], "values": [v for _, v in pairs],
            "next": next, "high": high}


def resolve(old, saved, new):
    return Bucket()._p_resolve_conflict(state(old), state(saved), state(new))


def test_resolve_merges_inserts_of_different_keys():
    old = [(1, "a"), (5, "e")]
    resolved = resolve(old, old + [(3, "c")], old + [(4, "d"), (9, "i")])
    assert resolved == state([(1, "a"), (3, "c"), (4, "d"), (5, "e"),
                              (9, "i")])


def test_resolve_merges_deletes_and_updates_of_different_keys():
    old = [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
    resolved = resolve(old, [(1, "A"), (2, "b"), (4, "d")],
                       [(1, "a"), (3, "c"), (4, "d"), (6, "f")])
    assert resolved == state([(1, "A"), (4, "d"), (6, "f")])


def test_resolve_into_an_empty_root_bucket():
    assert resolve([], [(1, 1)], [(2, 2)]) == state([(1, 1), (2, 2)])


def test_resolve_keeps_other_attributes_of_ours():
    old, saved, new = (state([(1, 1)]), state([(1, 1), (2, 2)]),
                       state([(0, 0), (1, 1)]))
    new["extra"] = "kept"
    resolved = Bucket()._p_resolve_conflict(old, saved, new)
    assert resolved["extra"] == "kept" and resolved["keys"] == [0, 1, 2]


@pytest.mark.parametrize("saved, new", [
    ([(1, "a"), (2, "x")], [(1, "a"), (2, "y")]),     # both insert 2
    ([(1, "a"), (2, "x")], [(1, "a"), (2, "x")]),     # even identically
    ([(1, "A")], [(1, "B")]),                         # both change 1
    ([(1, "A")], [(2, "b")]),                         # change vs delete
    ([(2, "b")], [(3, "c")]),                         # both delete 1
])
def test_resolve_refuses_same_key(saved, new):
    with pytest.raises(ConflictError, match="both transactions changed"):
        resolve([(1, "a")], saved, new)


def test_resolve_names_a_tuple_key_both_changed():
    # "%r" % key took a tuple key for its arguments: a TypeError, logged.
    with pytest.raises(ConflictError, match=r"both transactions changed key \(1, 'a'\)"):
        resolve([((1, "a"), 1)], [((1, "a"), 2)], [((1, "a"), 3)])


@pytest.mark.parametrize("changed", [
    {"next": Bucket()}, {"high": 2}, {"unlinked": True}, {"reshaped": 2}])
def test_resolve_refuses_split_or_unlink(changed):
    old = state([(1, 1), (2, 2)], high=10)
    reshaped = dict(state([(1, 1)], high=10), **changed)
    grown = state([(1, 1), (2, 2), (3, 3)], high=10)
    with pytest.raises(ConflictError, match="split or unlinked"):
        Bucket()._p_resolve_conflict(old, reshaped, grown)
    with pytest.raises(ConflictError, match="split or unlinked"):
        Bucket()._p_resolve_conflict(old, grown, reshaped)


_UTC, _CET = datetime.timezone.utc, datetime.timezone(datetime.timedelta(hours=1))


@pytest.mark.parametrize("before, after", [
    (0.0, -0.0),
    (decimal.Decimal("1.0"), decimal.Decimal("1.00")),
    (datetime.datetime(2024, 1, 1, 12, tzinfo=_UTC),
     datetime.datetime(2024, 1, 1, 13, tzinfo=_CET)),  # one instant
    ((1,), (True,)),
    ([1, [2.0]], [1, [2]]),
    ({"a": 1}, {"a": True}),
    (frozenset({1}), frozenset({True})),
])
def test_resolve_keeps_a_change_to_an_equal_but_different_value(before, after):
    # Equal is not unchanged: taking it for unchanged undid the other commit.
    resolved = resolve([(1, before)], [(1, after)], [(1, before), (2, "ours")])
    assert resolved["keys"] == [1, 2] and resolved["values"][0] is after
    with pytest.raises(ConflictError, match="both transactions changed"):
        resolve([(1, before)], [(1, after)], [(1, "ours")])


def test_a_merge_keeps_another_commits_change_to_an_equal_value(db):
    tree = stored(db, OOBTree({"zero": 0.0, "price": decimal.Decimal("1.0")}))
    tree["ours"] = 1
    in_other_thread(lambda: tree.update(zero=-0.0, price=decimal.Decimal("1.00")))
    transaction.commit()  # one bucket, different keys: merged
    assert str(tree["zero"]) == "-0.0" and str(tree["price"]) == "1.00" and tree["ours"] == 1


def test_resolve_takes_copies_of_unchanged_values_as_unchanged():
    # The states a resolver gets are deep copies: equal content, new objects.
    items = Bucket(), Bucket()
    values = [[items[0], 1.5, ("t", None)], {"k": [b"x"], "z": -0.0},
              datetime.datetime(2024, 1, 1, tzinfo=_CET), decimal.Decimal("1.10"), float("nan")]
    old = [(n, value) for n, value in enumerate(values)]
    # As the commit copies them: persistent objects kept.
    saved = copy.deepcopy(old, KeepPersistent()) + [(10, "theirs")]
    new = copy.deepcopy(old, KeepPersistent()) + [(11, "ours")]
    resolved = resolve(old, saved, new)
    assert resolved["keys"] == list(range(len(values))) + [10, 11]


def test_resolve_refuses_emptied_bucket():
    with pytest.raises(ConflictError, match="emptied"):
        resolve([(1, 1)], [], [(1, 1), (2, 2)])
    with pytest.raises(ConflictError, match="emptied"):
        resolve([(1, 1)], [(1, 1), (2, 2)], [])


def test_resolve_refuses_merge_that_empties():
    with pytest.raises(ConflictError, match="empty the bucket"):
        resolve([(1, 1), (2, 2)], [(2, 2)], [(1, 1)])


def test_resolve_refusal_names_the_class():
    with pytest.raises(ConflictError) as info:
        resolve([(1, 1)], [(1, 2)], [(1, 3)])
    assert info.value.class_name == "Bucket"


def test_length_resolves_by_adding_deltas():
    length = Length(10)
    assert length() == 10
    resolved = length._p_resolve_conflict({"value": 10}, {"value": 13},
                                          {"value": 9})
    assert resolved == {"value": 12}


# -- concurrency: threads sharing one Database --------------------------------

class CountingTree(OOBTree):
    """Counts the walks from the root its writers make."""

    walks = 0

    def _find(self, key):
        type(self).walks += 1
        return super()._find(key)


def test_inserts_in_key_order_skip_the_walk_from_the_root(db):
    tree = stored(db, CountingTree())
    CountingTree.walks = 0
    for key in range(640):
        tree[key] = key
    # A walk per split (at 65 keys, then every 32), not one per insert.
    assert CountingTree.walks < 40
    transaction.commit()
    check_invariants(tree)
    assert list(tree.items()) == [(key, key) for key in range(640)]


def test_an_insert_skipping_the_walk_merges_with_a_concurrent_insert(db):
    tree = stored(db, OOBTree((k, k) for k in range(10)))
    tree[10] = tree[11] = "ours"  # key after key: the next insert skips the walk
    in_other_thread(lambda: tree.update({12: "theirs", 13: "theirs"}))
    tree[14] = "ours"  # into our copy of the bucket they changed meanwhile
    transaction.commit()  # different keys of one bucket: merged
    check_invariants(tree)
    assert [tree[k] for k in range(10, 15)] == ["ours"] * 2 + ["theirs"] * 2 + ["ours"]


def test_an_insert_skipping_the_walk_conflicts_with_a_concurrent_split(db):
    tree = stored(db, OOBTree((k, k) for k in range(10)))
    tree[10] = tree[11] = "ours"
    in_other_thread(lambda: tree.update((k, "theirs") for k in range(100, 160)))
    tree[12] = "ours"  # into our copy of the bucket they split meanwhile
    with pytest.raises(ConflictError):
        transaction.commit()
    transaction.abort()
    for key in (10, 11, 12):  # the application's retry, walking anew
        tree[key] = "ours"
    transaction.commit()
    check_invariants(tree)
    assert len(tree) == 73 and tree[12] == "ours" and tree[159] == "theirs"


def test_an_insert_after_a_concurrent_split_of_the_last_bucket_goes_where_lookups_go(db):
    tree = grown(db, OOBTree(), ((k, k) for k in range(100)))  # a last bucket of 50
    tree[100] = tree[101] = "ours"  # key after key into the last bucket
    in_other_thread(lambda: tree.update((k, "theirs") for k in range(200, 320, 2)))
    tree[251] = "ours"  # above the split: the walk leads to their new bucket
    assert tree.get(251) == "ours" and 251 in tree
    del tree[251]  # this transaction finds its own insert
    with pytest.raises(ConflictError):
        transaction.commit()  # we changed the bucket they split


class TinyTree(OOBTree):
    """Five keys split a bucket."""

    max_bucket_size = max_node_size = 4


def test_a_split_undone_by_an_unlink_still_conflicts_with_our_copy_of_the_bucket(db):
    # Split, then the new half emptied and unlinked: the bucket had its
    # shape back, the merge took our stale copy, and our removal of our
    # own insert (sent to the other half meanwhile) was lost: 10 stored.
    tree = stored(db, TinyTree([(0, "base")]))
    tree[10] = "ours"
    in_other_thread(lambda: tree.update({1: "x", 2: "x", 3: "x", 4: "x"}))
    tree.pop(10, None)
    in_other_thread(lambda: [tree.pop(key) for key in (2, 3, 4)])
    with pytest.raises(ConflictError, match="Bucket"):
        transaction.commit()
    transaction.abort()
    assert dict(tree) == {0: "base", 1: "x"}
    check_invariants(tree)


def test_where_an_insert_went_is_forgotten_when_its_transaction_ends(db):
    from dobbin.session import session_hints
    tree = stored(db, OOBTree())
    tree[1] = tree[2] = 1
    assert session_hints()
    transaction.commit()
    assert not session_hints()  # nothing of the transaction is kept alive
    tree[3] = 1
    transaction.abort()
    assert not session_hints() and list(tree) == [1, 2]


class ThreadTree(OOBTree):
    """Small enough that concurrent inserts split and unlink a lot."""

    max_bucket_size = 8
    max_node_size = 6


def test_len_counts_what_the_thread_sees_while_others_commit(db):
    tree = stored(db, ThreadTree((k, k) for k in range(40)))
    tree[-1] = "mine"  # checks out the counter: its copy says 41

    def insert_elsewhere():
        for key in range(1000, 1010):  # buckets this thread did not check out
            tree[key] = "theirs"
    in_other_thread(insert_elsewhere)
    assert len(tree) == len(list(tree)) == 51
    del tree[0]
    assert len(tree) == len(list(tree)) == 50
    tree.clear()  # one key at a time here: the counter is checked out
    assert (len(tree), bool(tree), list(tree)) == (0, False, [])
    transaction.commit()
    assert len(tree) == len(list(tree)) == 0
    tree.update((k, k) for k in range(5))
    transaction.commit()
    tree.clear()  # the quick way: the old buckets are dropped whole

    in_other_thread(lambda: tree.__setitem__(99, "theirs"))  # into the dropped buckets
    assert len(tree) == len(list(tree)) == 0
    transaction.commit()  # as if their insert came first, and then the clear
    assert len(tree) == len(list(tree)) == 0


def test_threads_insert_and_delete_concurrently(db):
    tree = stored(db, ThreadTree((-k, "old") for k in range(1, 101)))
    writers, per_writer = 4, 240
    errors = []
    stop = threading.Event()

    def write(number):
        try:
            mine = list(range(number, writers * per_writer, writers))
            for batch_start in range(0, len(mine), 8):
                batch = mine[batch_start:batch_start + 8]
                for attempt in transaction.manager.attempts(100):
                    with attempt:
                        for key in batch:
                            tree[key] = number
            for batch_start in range(0, len(mine), 16):
                batch = mine[batch_start:batch_start + 16:2]
                for attempt in transaction.manager.attempts(100):
                    with attempt:
                        for key in batch:
                            del tree[key]
        except Exception:
            errors.append(traceback.format_exc())

    def read():
        try:
            while not stop.is_set():
                transaction.begin()
                keys = list(tree.keys())
                # In order, no repeats, and old keys always there.
                assert keys == sorted(set(keys)), "iteration out of order"
                assert set(range(-100, 0)) <= set(keys)
                backwards = list(reversed(tree))
                assert backwards == sorted(set(backwards), reverse=True), "reversed out of order"
                assert set(range(-100, 0)) <= set(backwards)
                for key in random.sample(range(-100, 0), 10):
                    assert tree[key] == "old"
                transaction.abort()
        except Exception:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=write, args=(n,))
               for n in range(writers)]
    reader = threading.Thread(target=read)
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    stop.set()
    reader.join(60)
    assert not errors, "\n".join(errors)
    transaction.begin()
    expected = {-k: "old" for k in range(1, 101)}
    for number in range(writers):
        mine = list(range(number, writers * per_writer, writers))
        deleted = set()
        for batch_start in range(0, len(mine), 16):
            deleted.update(mine[batch_start:batch_start + 16:2])
        expected.update((key, number) for key in mine if key not in deleted)
    assert tree == expected
    check_invariants(tree, allow_empty=True)


class RacedTree(SmallTree):
    """Runs `race` (once) between a writer's descent and its checkout."""

    race = None

    def _find(self, key):
        found = super()._find(key)
        race, type(self).race = type(self).race, None
        if race is not None:
            race()
        return found


@pytest.fixture
def raced(db):
    tree = grown(db, RacedTree(), ((k, k) for k in range(0, 40, 2)))
    yield tree
    RacedTree.race = None


def split_20s(tree):
    """Grow bucket [20, 22] (high 24) to five keys: it splits at 21.5."""
    tree.update({21: "theirs", 21.5: "theirs", 23: "theirs"})


def test_insert_after_a_concurrent_split_of_its_bucket(raced):
    bucket = leaf_for(raced, 22.5)
    assert bucket.keys == [20, 22]
    RacedTree.race = lambda: in_other_thread(lambda: split_20s(raced))
    raced[22.5] = "ours"  # the path read predates the split
    assert bucket.high == 21.5  # so the insert went to the new bucket
    transaction.commit()
    check_invariants(raced)
    assert raced[22.5] == "ours" and len(raced) == 24


def test_insert_after_a_concurrent_unlink_of_its_bucket(raced):
    bucket = leaf_for(raced, 21)
    doomed = list(bucket.keys)

    def unlink():
        for key in doomed:
            del raced[key]
    RacedTree.race = lambda: in_other_thread(unlink)
    raced[21] = "ours"  # descended to a bucket about to be unlinked
    transaction.commit()
    assert bucket.unlinked
    check_invariants(raced)
    assert raced[21] == "ours" and len(raced) == 21 - len(doomed)


def test_iterating_past_our_copy_of_a_bucket_relinked_by_another_commit(db):
    tree = stored(db, SmallTree((k, k) for k in range(0, 40, 2)))
    ours = leaf_for(tree, 20)
    doomed = list(ours.next.keys)
    tree[21] = "ours"  # our copy of the bucket still links to the next one

    def unlink_next():
        for key in doomed:
            del tree[key]
    in_other_thread(unlink_next)  # relinks the committed bucket past it
    with pytest.raises(ConflictError, match="split or unlinked by another commit"):
        list(tree.keys())  # went round forever: back to our copy, on to the unlinked one
    with pytest.raises(ConflictError):
        tree.clear()  # we changed the size: it removes key by key, so it iterates
    with pytest.raises(ConflictError):
        transaction.commit()
    transaction.abort()
    assert list(tree.keys()) == [k for k in range(0, 40, 2) if k not in doomed]


def test_iterating_our_copy_of_the_last_bucket_after_another_commit_split_it(db):
    tree = stored(db, SmallTree((k, k) for k in range(0, 40, 2)))
    tree[38] = "ours"  # our copy of the last bucket: no next
    in_other_thread(lambda: tree.update((k, "theirs") for k in range(39, 45)))
    with pytest.raises(ConflictError):
        list(tree.items())  # stopped at our copy: 6 keys short of len()
    with pytest.raises(ConflictError):
        transaction.commit()


def test_a_lookup_reads_our_copy_of_a_bucket_another_commit_split(db):
    # No conflict yet: a savepoint rollback may drop the copy, and then
    # the transaction commits.
    tree = grown(db, SmallTree(), ((k, k) for k in range(0, 40, 2)))
    savepoint = transaction.savepoint()
    tree[21] = "tentative"  # our copy of bucket [20, 22]
    in_other_thread(lambda: split_20s(tree))
    assert tree.get(20) == 20 and tree.get(21) == "tentative"
    savepoint.rollback()
    transaction.commit()
    assert list(tree.keys(20, 23)) == [20, 21, 21.5, 22, 23] and tree[21] == "theirs"
    check_invariants(tree)


def test_iterating_our_copy_of_a_bucket_another_commit_only_added_to(db):
    tree = stored(db, SmallTree((k, k) for k in range(0, 40, 2)))
    tree[20] = "ours"
    in_other_thread(lambda: tree.__setitem__(21, "theirs"))  # no split
    assert dict(tree.items())[20] == "ours" and 21 not in list(tree)  # our copy
    transaction.commit()  # different keys of one bucket: merged
    assert tree[20] == "ours" and tree[21] == "theirs"
    check_invariants(tree)


def test_lookup_moves_right_past_a_concurrent_split(raced, monkeypatch):
    import dobbin.btree
    bucket = leaf_for(raced, 22)
    real_node_state = dobbin.btree._node_state
    pending = [lambda: in_other_thread(lambda: split_20s(raced))]

    def node_state(node):
        state = real_node_state(node)
        if pending and any(child is bucket for child in state[1]):
            pending.pop()()  # split the bucket after its parent was read
        return state
    monkeypatch.setattr(dobbin.btree, "_node_state", node_state)
    assert raced[22] == 22  # found in the new right sibling
    assert not pending and 22 not in bucket.keys


def test_max_key_moves_right_past_a_concurrent_split(raced, monkeypatch):
    import dobbin.bucket
    last = leaf_for(raced, 38)
    real_node_state = dobbin.bucket._node_state
    pending = [lambda: in_other_thread(lambda: raced.update({39: 0, 40: 0, 41: 0, 42: 0}))]

    def node_state(node):
        state = real_node_state(node)
        if pending and state[1][-1] is last:
            pending.pop()()  # split the last bucket after its parent was read
        return state
    monkeypatch.setattr(dobbin.bucket, "_node_state", node_state)
    assert raced.maxKey() == 42  # in the new right sibling the parent did not show
    assert not pending and 42 not in last.keys


def test_max_key_below_a_bound_after_a_concurrent_unlink_on_its_left(db, monkeypatch):
    # The buckets left of the one found were read from positions the walk
    # took; after another commit unlinked one, they took in the bucket
    # found itself: maxKey(11) returned 12, and reversed() repeated keys.
    import dobbin.btree
    tree = stored(db, SmallTree((k, k) for k in (0, 1, 2, 10, 11, 12, 20, 21, 22)))
    del tree[10], tree[11]
    transaction.commit()
    assert [list(bucket.keys) for bucket in tree._root.children] == [[0, 1, 2], [12], [20, 21, 22]]
    real_buckets_before = dobbin.btree._buckets_before
    pending = [lambda: in_other_thread(lambda: [tree.pop(k) for k in (0, 1, 2)])]

    def buckets_before(path):
        if pending:
            pending.pop()()  # the first bucket goes, after the walk to [12]
        return real_buckets_before(path)

    monkeypatch.setattr(dobbin.btree, "_buckets_before", buckets_before)
    with pytest.raises(ValueError, match="no key in the OOBTree is <= 11"):
        tree.maxKey(11)
    assert not pending and list(tree) == [12, 20, 21, 22]
    pending.append(lambda: in_other_thread(lambda: tree.__setitem__(5, 5)))
    assert tree.maxKey(11) == 5  # still found, when the race adds a key


def test_a_lookup_waits_for_a_commit_publishing_an_unlink(db, monkeypatch):
    tree = stored(db, SmallTree((k, k) for k in range(40)))
    doomed = list(leaf_for(tree, 21).keys)
    real_install, seen = db._cache.install, []

    def install(obj, state, *args):
        real_install(obj, state, *args)
        if state.get("unlinked") and not seen:
            # The emptied bucket is published, its parent not yet: a
            # reader meets the half-published change meanwhile.
            reader = threading.Thread(target=lambda: seen.append(lookup()))
            reader.start()
            reader.join(0.2)

    def lookup():
        try:
            return tree.get(21, "absent")
        except ConflictError as error:
            return error
    def empty_the_bucket():
        for key in doomed:
            del tree[key]
    monkeypatch.setattr(db._cache, "install", install)
    in_other_thread(empty_the_bucket)
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == ["absent"]


def test_insert_or_delete_racing_a_clear_conflicts_and_retries(db):
    tree = stored(db, SmallTree((k, k) for k in range(40)))
    for change in (lambda: tree.__setitem__(2.5, "ours"), lambda: tree.__delitem__(3)):
        change()  # into a bucket the clear below drops
        in_other_thread(tree.clear)
        with pytest.raises(ConflictError):
            transaction.commit()  # it would be lost in a dropped bucket
        transaction.abort()
        assert len(tree) == 0 and list(tree) == []
        for attempt in transaction.manager.attempts(3):
            with attempt:
                tree[2.5] = "ours"
        assert dict(tree.items()) == {2.5: "ours"} and len(tree) == 1
        in_other_thread(lambda: tree.update((k, k) for k in range(40)))


def test_clear_after_a_concurrent_insert_drops_it(db):
    tree = stored(db, SmallTree((k, k) for k in range(40)))
    tree.clear()
    in_other_thread(lambda: tree.__setitem__(2.5, "theirs"))
    transaction.commit()  # serialised after the insert: it empties the tree
    assert len(tree) == 0 and list(tree) == []


def test_insert_after_a_concurrent_clear_starts_over(raced):
    RacedTree.race = lambda: in_other_thread(raced.clear)
    raced[21] = "ours"  # descended into a bucket the clear drops
    transaction.commit()
    assert dict(raced.items()) == {21: "ours"} and len(raced) == 1
    check_invariants(raced)


# -- concurrency: two processes on one file -----------------------------------

def _worker(path, key, value, first, events, results, name):
    """Run in a child process: set tree[key] = value in one transaction,
    committing first or second as told, retrying conflicts with
    transaction.manager.attempts(); report to `results`."""
    try:
        mine, theirs, first_done = events
        calls = {"Bucket": 0, "Length": 0}
        for cls in (Bucket, Length):
            original = cls._p_resolve_conflict

            def counting(self, old, saved, new, _original=original,
                         _name=cls.__name__):
                calls[_name] += 1
                return _original(self, old, saved, new)
            cls._p_resolve_conflict = counting
        database = Database(path)
        attempts, conflicts = 0, []
        for attempt in transaction.manager.attempts(5):
            with attempt:
                attempts += 1
                tree = database.root
                tree[key] = value
                if attempts == 1:
                    # Both hold their checkouts before either commits.
                    mine.set()
                    if not theirs.wait(60):
                        raise RuntimeError("the other process never started")
                    if not first and not first_done.wait(60):
                        raise RuntimeError("the first commit never happened")
                try:
                    transaction.commit()
                except ConflictError as error:
                    conflicts.append(type(error).__name__)
                    raise
                finally:
                    if first:
                        first_done.set()
        database.close()
        results.put((name, "ok", attempts, conflicts, calls))
    except Exception:
        results.put((name, "error", traceback.format_exc()))


def run_two_writers(path, first_write, second_write):
    """Run two processes writing concurrently; return their reports."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ready_first, ready_second, first_done = (context.Event(), context.Event(),
                                             context.Event())
    processes = [
        context.Process(target=_worker, args=(
            path, *first_write, True, (ready_first, ready_second, first_done),
            results, "first")),
        context.Process(target=_worker, args=(
            path, *second_write, False, (ready_second, ready_first,
                                         first_done), results, "second")),
    ]
    for process in processes:
        process.start()
    reports = {}
    for _ in processes:
        report = results.get(timeout=120)
        reports[report[0]] = report[1:]
    for process in processes:
        process.join(60)
    for name, report in reports.items():
        assert report[0] == "ok", "%s failed:\n%s" % (name, report[1])
    return reports


@pytest.fixture
def shared_file(tmp_path):
    """A database file holding an OOBTree of 200 even keys (7 buckets)."""
    path = str(tmp_path / "shared.dobbin")
    with Database(path) as database:
        stored(database, OOBTree((k, "base") for k in range(0, 400, 2)))
    return path


def test_two_processes_insert_into_the_same_bucket(shared_file):
    with Database(shared_file) as database:
        tree = database.root
        bucket = leaf_for(tree, 101)
        assert leaf_for(tree, 103) is bucket
        assert len(bucket.keys) <= tree.max_bucket_size - 2  # no split
    reports = run_two_writers(shared_file, (101, "A"), (103, "B"))
    assert reports["first"][1:3] == (1, [])
    # The second commit merged into the first's bucket: no retry needed.
    assert reports["second"][1:3] == (1, [])
    assert reports["second"][3] == {"Bucket": 1, "Length": 1}
    with Database(shared_file) as database:
        tree = database.root
        assert tree[101] == "A" and tree[103] == "B" and len(tree) == 202
        check_invariants(tree)


def test_two_processes_insert_into_different_buckets(shared_file):
    with Database(shared_file) as database:
        tree = database.root
        assert leaf_for(tree, 1) is not leaf_for(tree, 391)
    reports = run_two_writers(shared_file, (1, "A"), (391, "B"))
    assert reports["second"][1:3] == (1, [])
    # Only the counter was shared; no bucket needed resolution.
    assert reports["second"][3] == {"Bucket": 0, "Length": 1}
    with Database(shared_file) as database:
        tree = database.root
        assert tree[1] == "A" and tree[391] == "B" and len(tree) == 202
        check_invariants(tree)


def test_two_processes_set_the_same_key(shared_file):
    reports = run_two_writers(shared_file, (101, "A"), (101, "B"))
    assert reports["first"][1:3] == (1, [])
    attempts, conflicts = reports["second"][1:3]
    assert attempts == 2 and len(conflicts) == 1
    assert conflicts[0] in ("ReadConflictError", "WriteConflictError")
    with Database(shared_file) as database:
        tree = database.root
        assert tree[101] == "B" and len(tree) == 201
        check_invariants(tree)
        assert database.verify()["failed"] == 1
