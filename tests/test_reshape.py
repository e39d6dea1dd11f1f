"""Tests of dobbin.reshape: splits and unlinks keep every invariant,
and the checkouts before them notice another thread's commit."""

import random

import pytest
import transaction

from dobbin.btree import Bucket, Length
from dobbin.persistent import checked_out, checkout
from dobbin.reshape import all_droppable, built, checkout_for_split, checkout_for_unlink

from btree_fixtures import (SmallTree, check_invariants, grown, in_other_thread, leaf_for,
                            stored, tree_depth)


@pytest.fixture
def db(open_db):
    return open_db(durability="none")


def test_inserts_split_buckets_and_nodes():
    tree = SmallTree()
    keys = list(range(100))
    random.Random(1).shuffle(keys)
    for key in keys:
        tree[key] = key * 10
        check_invariants(tree)
    assert len(tree) == 100
    assert tree_depth(tree) >= 3
    assert list(tree) == list(range(100))
    assert list(tree.values()) == [k * 10 for k in range(100)]
    assert tree[42] == 420 and 42 in tree and 100 not in tree


def test_deletes_unlink_buckets_and_collapse_root(db):
    tree = stored(db, SmallTree((k, str(k)) for k in range(200)))
    keys = list(range(200))
    random.Random(2).shuffle(keys)
    for count, key in enumerate(keys, 1):
        del tree[key]
        leaves = check_invariants(tree)
        assert len(tree) == 200 - count
        # Committed buckets are unlinked once empty: no leaf is wasted.
        assert len(leaves) <= max(1, len(tree))
        if count % 50 == 0:
            transaction.commit()
    transaction.commit()
    assert isinstance(tree._root, Bucket) and tree_depth(tree) == 0
    tree["again"] = 1
    transaction.commit()
    assert list(tree.items()) == [("again", 1)]


def test_delete_from_the_middle_relinks_leaves(db):
    tree = stored(db, SmallTree((k, k) for k in range(60)))
    for key in range(20, 40):
        del tree[key]
        check_invariants(tree)
    transaction.commit()
    assert list(tree) == list(range(20)) + list(range(40, 60))
    assert tree.maxKey(30) == 19 and tree.minKey(30) == 40
    tree[30] = "refills the gap"
    check_invariants(tree)
    transaction.commit()


def test_new_buckets_emptied_in_their_transaction_stay(db):
    # The store refuses to commit a checked-out new object that became
    # unreachable, so such buckets stay (empty) instead of being unlinked.
    tree = stored(db, SmallTree())
    for key in range(40):
        tree[key] = key
    for key in range(40):
        del tree[key]
    check_invariants(tree, allow_empty=True)
    transaction.commit()
    assert len(tree) == 0 and list(tree) == []
    with pytest.raises(ValueError):
        tree.maxKey()
    for key in range(0, 40, 3):
        tree[key] = key
    check_invariants(tree, allow_empty=True)
    transaction.commit()
    assert list(tree) == list(range(0, 40, 3))
    assert tree.maxKey(38) == 36 and tree.minKey(37) == 39


def test_a_split_gives_up_when_another_commit_unlinked_the_bucket(db):
    tree = stored(db, SmallTree((k, k) for k in range(0, 40, 2)))
    path, bucket, _ = tree._find(20)
    doomed = list(bucket.keys)
    in_other_thread(lambda: [tree.__delitem__(key) for key in doomed])
    assert checkout_for_split(tree, path, bucket) is False  # the parent lost it: walk again


def test_an_unlink_gives_up_when_another_commit_moved_the_bucket(db):
    tree = grown(db, SmallTree(), ((k, k) for k in range(0, 40, 2)))
    path, bucket, _ = tree._find(32)
    parent = path[-1][0]
    # Their inserts split the bucket twice, and then its parent: the
    # upper half of the parent's children, the bucket among them, moves.
    in_other_thread(lambda: tree.update((k, k) for k in range(39, 50)))
    assert bucket not in parent.children
    assert checkout_for_unlink(tree, path, bucket) is None  # walk again
    path, bucket, _ = tree._find(24)  # its parent keeps other children
    assert checkout_for_unlink(tree, path, bucket) == (len(path) - 1, leaf_for(tree, 22))


def test_new_buckets_are_kept_rather_than_unlinked(db):
    tree = stored(db, SmallTree())
    tree.update((k, k) for k in range(10))  # new buckets, checked out
    path, bucket, _ = tree._find(9)
    assert bucket._p_oid is None
    assert checkout_for_unlink(tree, path, bucket) is False
    assert not all_droppable(tree._root)  # so clear() empties them key by key
    transaction.commit()
    assert all_droppable(tree._root) and not checked_out(tree._root)
    tree.clear()
    assert isinstance(tree._root, Bucket) and len(tree) == 0


def test_built_fills_buckets_and_nodes_three_quarters_with_every_leaf_at_one_depth():
    tree = SmallTree()
    checkout(tree)
    tree._root = built([(k, str(k)) for k in range(100)], 4, 4)
    tree._length = Length(100)
    leaves = check_invariants(tree)
    assert [len(leaf.keys) for leaf in leaves] == [3] * 33 + [1]
    assert tree_depth(tree) == 4 and tree[57] == "57"  # 34 leaves, 12, 4, 2, 1 nodes
    assert isinstance(built([], 4, 4), Bucket) and not built([], 4, 4).keys
    transaction.abort()
