"""Helpers shared by the B-tree's tests (tests/test_btree.py and
tests/test_reshape.py): a tree with tiny buckets and nodes, a checker of
every structural invariant, and a commit made by another thread."""

import threading
import traceback

import transaction

from dobbin.btree import Bucket, Node, OOBTree


class SmallTree(OOBTree):
    """Tiny nodes so that a few dozen keys build a three-level tree."""

    max_bucket_size = 4
    max_node_size = 4


def stored(db, tree):
    """Make `tree` the root of `db` and commit it."""
    db.elect(tree)
    transaction.commit()
    return tree


def grown(db, tree, pairs):
    """Store empty `tree` in `db`, then insert `pairs` and commit: the
    shape inserts give (half-full buckets), which the races are set in.
    A tree built from items fills its buckets three quarters."""
    stored(db, tree).update(pairs)
    transaction.commit()
    return tree


def check_invariants(tree, allow_empty=False):
    """Check every structural invariant of `tree`; return its leaves.

    `allow_empty`: buckets created and emptied in one transaction stay
    in the tree, so tests that do that allow empty buckets.
    """
    leaves = []
    root = tree._root

    def walk(node, low, high, level):
        if isinstance(node, Node):
            assert len(node.children) == len(node.keys) + 1
            assert 1 <= len(node.children) <= tree.max_node_size
            assert node.keys == sorted(set(node.keys))
            for key in node.keys:
                assert low is None or low <= key
                assert high is None or key < high
            bounds = [low] + list(node.keys) + [high]
            levels = {walk(child, bounds[i], bounds[i + 1], level + 1)
                      for i, child in enumerate(node.children)}
            assert len(levels) == 1, "leaves at different depths"
            return levels.pop()
        assert isinstance(node, Bucket)
        assert not node.unlinked
        assert len(node.keys) == len(node.values)
        assert node.keys == sorted(set(node.keys))
        assert len(node.keys) <= tree.max_bucket_size
        assert node.high == high, "bucket's high bound disagrees with tree"
        if node is not root and not allow_empty:
            assert node.keys, "empty bucket left linked in the tree"
        for key in node.keys:
            assert low is None or low <= key
            assert high is None or key < high
        leaves.append(node)
        return level

    walk(root, None, None, 0)
    for left, right in zip(leaves, leaves[1:]):
        assert left.next is right, "leaves not linked in order"
    assert leaves[-1].next is None
    assert sum(len(leaf.keys) for leaf in leaves) == len(tree)
    return leaves


def tree_depth(tree):
    node, levels = tree._root, 0
    while isinstance(node, Node):
        node, levels = node.children[0], levels + 1
    return levels


def leaf_for(tree, key):
    return tree._find(key)[1]


def in_other_thread(work):
    """Run `work` in another thread, in its own committed transaction."""
    errors = []

    def run():
        try:
            work()
            transaction.commit()
        except Exception:
            errors.append(traceback.format_exc())
            transaction.abort()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not errors, errors[0]
