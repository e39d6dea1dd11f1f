"""Structural changes of an `OOBTree`: splits and unlinks.

A split moves the upper half of an overfull bucket into a new right
sibling and adds it to the parent node, splitting nodes upwards as they
overflow (a root split gives the tree a new root).  An unlink cuts an
emptied bucket out of the leaf chain and its parent, removes nodes left
childless, and collapses a root left with a single child.

Each change is made in two steps.  First every object it will change is
checked out and verified against the path the walk took (`checkout_for_*`):
another thread's commit may have moved things since.  Then the change is
made in those working copies.  A concurrent writer of any of them
conflicts at commit, so nothing it relied on changes under it.

New objects (created in this transaction) are never cut loose: the store
refuses to commit a new object that this thread checked out and then left
unreachable, and changing an object checks it out.  Such buckets and nodes
stay in the tree, empty.
"""

from dobbin.bucket import Bucket, Node, _buckets_before, _index_of, _node_state
from dobbin.persistent import checked_out, checkout


def _kept_alive(obj):
    """Must `obj`, which we are about to change, stay in the tree?"""
    return obj._p_oid is None


def _droppable(obj):
    """May `obj` be cut loose from the tree without being changed?"""
    return obj._p_oid is not None or not checked_out(obj)


def all_droppable(node):
    """May the whole subtree under `node` be dropped unchanged (clear)?"""
    if not _droppable(node):
        return False
    if isinstance(node, Node):
        return all(all_droppable(child) for child in _node_state(node)[1])
    return True


# -- splits --------------------------------------------------------------------

def checkout_for_split(tree, path, child):
    """Check out each ancestor a split of `child` will change; False if
    one of them no longer holds the child the walk came through."""
    for node, _ in reversed(path):
        checkout(node)
        if _index_of(node.children, child) < 0:
            return False
        if len(node.children) < tree.max_node_size:
            return True
        child = node
    checkout(tree)
    return tree._root is child


def split_bucket(tree, path, bucket):
    """Move the upper half of checked-out `bucket` to a new bucket."""
    middle = len(bucket.keys) // 2
    right = Bucket(bucket.keys[middle:], bucket.values[middle:],
                   bucket.next, bucket.high)
    del bucket.keys[middle:]
    del bucket.values[middle:]
    bucket.next = right
    bucket.high = right.keys[0]
    bucket.reshaped += 1
    _insert_child(tree, path, bucket, right.keys[0], right)


def _insert_child(tree, path, left, separator, right):
    """Put `right` after `left` in the (checked-out) node `path` ends at,
    splitting nodes upwards as they overflow."""
    if not path:
        tree._root = Node([separator], [left, right])
        return
    node = path[-1][0]
    index = _index_of(node.children, left)
    node.keys.insert(index, separator)
    node.children.insert(index + 1, right)
    if len(node.children) > tree.max_node_size:
        middle = len(node.children) // 2
        promoted = node.keys[middle - 1]
        sibling = Node(node.keys[middle:], node.children[middle:])
        del node.keys[middle - 1:]
        del node.children[middle:]
        _insert_child(tree, path[:-1], node, promoted, sibling)


# -- a whole tree at once ---------------------------------------------------------

def built(pairs, max_bucket_size, max_node_size):
    """The root of a new tree holding `pairs` (sorted, distinct keys):
    buckets three quarters full, linked in order, under nodes as full,
    every leaf at one depth.  The pieces are new objects, their states
    set by their constructors: nothing is checked out."""
    if not pairs:
        return Bucket()
    keys, values = [key for key, _ in pairs], [value for _, value in pairs]
    per_bucket = max(1, max_bucket_size * 3 // 4)
    starts = range(0, len(keys), per_bucket)
    level, following = [], None
    for start in reversed(starts):  # right to left: each links to the next
        end = start + per_bucket
        following = Bucket(keys[start:end], values[start:end], following,
                           keys[end] if end < len(keys) else None)
        level.append((keys[start], following))  # (lowest key, subtree)
    level.reverse()
    per_node = max(2, max_node_size * 3 // 4)
    while len(level) > 1:
        level = [(group[0][0], Node([low for low, _ in group[1:]], [child for _, child in group]))
                 for group in (level[at:at + per_node] for at in range(0, len(level), per_node))]
    return level[0][1]


# -- unlinks -------------------------------------------------------------------

def checkout_for_unlink(tree, path, bucket):
    """Check out and verify what unlinking `bucket` changes.

    Returns (level, previous): path[level] is the node that keeps other
    children (-1: the root empties), previous the bucket before.  Returns
    False to keep the bucket (empty) instead, None to start over after a
    concurrent change.
    """
    if _kept_alive(bucket):
        return False
    child, level = bucket, len(path) - 1
    while level >= 0:
        node = path[level][0]
        checkout(node)
        index = _index_of(node.children, child)
        if index < 0:
            return None
        path[level] = (node, index)
        if len(node.children) > 1:
            break
        if _kept_alive(node):
            return False
        child, level = node, level - 1
    if level < 0:
        checkout(tree)
        if tree._root is not path[0][0]:
            return None
    previous = next(_buckets_before(path), None)
    if previous is not None:
        checkout(previous)
        if previous.unlinked or previous.next is not bucket:
            return None
    return level, previous


def unlink(tree, path, bucket, level, previous):
    """Cut emptied `bucket` (and nodes left childless) out of the tree;
    every object involved is checked out by `checkout_for_unlink`."""
    bucket.unlinked = True
    if previous is not None:
        previous.next = bucket.next
        if level >= 0 and path[level][1] > 0:
            # The left neighbour takes over the range of the bucket.
            previous.high = bucket.high
        previous.reshaped += 1
    for node, _ in path[level + 1:]:
        del node.children[:]  # an unlinked node has no children
    if level < 0:
        tree._root = Bucket()
        return
    node, index = path[level]
    del node.children[index]
    # Child i's range joins its left neighbour's (or child 0's, the new
    # first child's, which then reaches down to the node's lower bound).
    del node.keys[index - 1 if index else 0]
    if level == 0 and len(node.children) == 1:
        _collapse_root(tree, node)


def _collapse_root(tree, root):
    """Replace checked-out root node `root`, which has a single child, by
    that child (and so on down)."""
    checkout(tree)
    if tree._root is not root:
        return  # a concurrent root split: root is an inner node now
    while (isinstance(root, Node) and len(root.children) == 1
           and not _kept_alive(root)):
        checkout(root)
        child = root.children[0]
        # Rewritten, so a concurrent split into the node conflicts.
        del root.children[:]
        root = child
    tree._root = root
