"""A persistent B-tree mapping: `OOBTree`.

Items live in small persistent leaf `Bucket`s under persistent interior
`Node`s, so changing a key rewrites one bucket (plus the `Length` counter),
not the whole mapping, and reading loads only the buckets reached.

Invariants: a node's child ``i`` holds the keys ``k`` with
``keys[i-1] <= k < keys[i]`` and a linked node has children.  A bucket
holds sorted `keys`, parallel `values`, `next` (the following bucket) and
`high` (exclusive upper bound of its range; None is +infinity).  Emptied
buckets and childless nodes are unlinked (buckets are marked `unlinked`),
except new ones (see `dobbin.reshape`), so a linked bucket may be empty.

Threads: another thread's commit replaces an object's state at any moment,
even between two of our attribute reads.  So readers read per-object
snapshots (`_bucket_state`), restart on meeting an unlinked object, and
move right along `next` past a concurrent split, as in Lehman and Yao's
B-link trees.  Writers check out what they change, re-check in their own
copy that it is still the right object (key below `high`, child still in
its parent) and start over if not.  An iteration that meets this
thread's own copy of a bucket that another commit has since split or
unlinked raises ConflictError: that copy's links could make it skip keys
or go round forever (see `_walkable_bucket_state`).

Transactions: `Bucket._p_resolve_conflict` merges changes to different keys
of a bucket, `Length._p_resolve_conflict` merges counts.  A structural
change rewrites every object whose shape it relied on, so a concurrent
writer of those conflicts instead of losing items.
"""

from bisect import bisect_left, bisect_right
from collections.abc import Mapping, MutableMapping
from operator import itemgetter

from dobbin.bucket import (Bucket, Length, Node, RangeView, TreePart, _bucket_state,
                           _buckets_before, _check_key, _clears, _count, _counter_since, _last_key,
                           _leaves_backwards, _node_state, _walkable_bucket_state)
from dobbin.exc import ConflictError, InvalidTypeError, InvalidValueError
from dobbin.persistent import checked_out, checkout, state_of, working_copy
from dobbin.reshape import (all_droppable, built, checkout_for_split, checkout_for_unlink,
                            split_bucket, unlink)
from dobbin.session import serial_at_checkout, session_hints

_MISSING = object()
_GONE = object()  # popitem's default: its key was removed by a commit meanwhile
# Restarts allowed before a writer gives up; each one means another thread
# committed a structural change during this very call.
_RESTARTS = 100


def _lower_bound(path, leaf):
    """The lowest key a walk along `path` sends to `leaf` (None: no
    bound), or _MISSING if the nodes changed since the walk."""
    child = leaf
    for node, index in reversed(path):
        keys, children = _node_state(node)
        if index >= len(children) or children[index] is not child:
            return _MISSING
        if index:
            return keys[index - 1]
        child = node
    return None


def _insert_hinted(hint, key, value, replace):
    """`OOBTree._store` without a walk from the root, into the bucket
    where the thread's last insert into the tree appended a key in this
    transaction (a load in key order appends key after key there);
    _MISSING unless `key` surely belongs there and no split is due.

    `hint` is (tree, root, length, counter, bucket, state, serial, low,
    limit): the working copies, the bucket's serial, the lowest key the
    walk sent there and the size limit of that insert.  Sure when the
    tree has the same root (no clear, no root split since), the counter
    and the bucket are checked out in the same working copies (so in this
    transaction), no other commit changed the bucket since its checkout (a
    split or unlink would: the walk would then lead elsewhere), and
    ``low <= key < high``.  The lower bound of a bucket's range only falls,
    as neighbours are unlinked.
    """
    tree, root, length, counter, bucket, state, serial, low, limit = hint
    keys, high = state["keys"], state["high"]
    try:
        # The range first: random inserts mostly miss, and cheaply.
        if (low is not None and key < low) or (high is not None and not key < high):
            return _MISSING
        tree_state = state_of(tree)
        if (tree_state["_root"] is not root or tree_state["_length"] is not length
                or working_copy(bucket) is not state or working_copy(length) is not counter
                or bucket._p_serial != serial or state.get("unlinked", False)):
            return _MISSING
        index = bisect_left(keys, key)
        if index < len(keys) and not key < keys[index]:
            if replace:
                state["values"][index] = value
            return state["values"][index]
    except TypeError as exc:
        raise _incomparable(key, exc) from None
    if len(keys) >= limit:
        return _MISSING
    keys.insert(index, key)
    state["values"].insert(index, value)
    counter["value"] += 1
    return value


def _await_publication(tree):
    """Wait while a commit publishes its states (see
    IDatabase.await_publication): a reader that met half of its structural
    change would restart in vain."""
    jar = tree._p_jar
    if jar is not None:
        jar.await_publication()


def _incomparable(key, exc):
    return InvalidTypeError("key %r (%s) cannot be compared with the keys already "
                            "in this OOBTree: %s" % (key, type(key).__name__, exc))


def _changed_size():
    # As a dict says it: going on would skip keys or repeat them.
    return RuntimeError("OOBTree changed size during iteration (iterate over list(tree) "
                        "to change it as you go)")


def _bisect(function, keys, bound):
    try:
        return function(keys, bound)
    except TypeError as exc:
        raise _incomparable(bound, exc) from None


def _pairs_of(other):
    """The (key, value) pairs of a mapping, or of an iterable of pairs."""
    if isinstance(other, OOBTree):
        return list(other.items())  # other may be the tree being updated
    if isinstance(other, Mapping) or hasattr(other, "keys"):
        return [(key, other[key]) for key in other.keys()]
    return other


_first = itemgetter(0)


class OOBTree(TreePart):
    """A persistent, ordered mapping stored as a B-tree of small buckets.

    Supports the full mutable mapping API plus ordered ranges
    (`keys`/`values`/`items` with `min`, `max`, `excludemin`, `excludemax`)
    and `minKey`/`maxKey`.  Iteration is in key order; `len()` is O(1).

    Keys must be totally ordered and mutually comparable (all str, all
    numbers, tuples of those...), immutable, and not None or NaN; a key
    that cannot be compared with the keys present raises TypeError and
    leaves the tree unchanged.  Values may be anything the store can save.

    Mutating methods check out only the objects they change: an insert
    rewrites one bucket and the `Length` counter, a split also the parent
    node.  Do not mutate the tree while iterating over it (a change of
    size raises RuntimeError): iterate over a ``list(...)`` copy instead.
    """

    #: A bucket holding more items than this is split in two.
    max_bucket_size = 64
    #: A node holding more children than this is split in two.
    max_node_size = 128

    def __init__(self, items=None):
        # Built whole, in the new pieces' own states: inserting would check
        # the buckets out, into this thread's transaction alone (an abort
        # then emptied the tree, and another thread saw it empty).
        latest = {}
        for key, value in _pairs_of(() if items is None else items):
            _check_key(key)
            latest[key] = value
        try:
            pairs = sorted(latest.items(), key=_first)
        except TypeError as exc:
            raise InvalidTypeError("OOBTree keys must be mutually comparable: %s" % exc) from None
        self._root = built(pairs, type(self).max_bucket_size, type(self).max_node_size)
        self._length = Length(len(pairs))

    # -- finding things ----------------------------------------------------

    def _find(self, key):
        """Return (path, bucket, state): the leaf whose range holds `key`,
        its `_bucket_state`, and the (node, index) pairs walked to it.

        `key` is None for the first leaf.  The path may be stale; writers
        verify it after checking out.
        """
        for attempt in range(_RESTARTS):
            if attempt:
                _await_publication(self)
            path, node = [], state_of(self)["_root"]
            try:
                while type(node) is Node:  # isinstance() would ask a Bucket its __class__
                    keys, children = _node_state(node)
                    if not children:
                        break  # unlinked by a concurrent commit
                    index = 0 if key is None else bisect_right(keys, key)
                    path.append((node, index))
                    node = children[index]
                else:
                    state = _bucket_state(node)
                    # A concurrent split may have moved our key rightwards.
                    while (key is not None and not state[4]
                           and state[3] is not None and not key < state[3]
                           and state[2] is not None):
                        node = state[2]
                        state = _bucket_state(node)
                    if not state[4]:
                        return path, node, state
            except TypeError as exc:
                raise _incomparable(key, exc) from None
        raise self._gave_up(key)

    def _gave_up(self, key):
        # Two causes: other commits kept reshaping the tree, or this
        # transaction's own copy of a piece links to one since unlinked.
        return ConflictError("OOBTree oid %s: no consistent path to key %r in %d tries; "
                             "other commits reshaped it, so this transaction must be retried"
                             % (self._p_oid, key, _RESTARTS),
                             oid=self._p_oid, class_name=type(self).__name__)

    def lookup_path(self, key):
        """The persistent objects a lookup of `key` reads: the tree, the
        nodes from its root down, and the leaf bucket.  None of them
        changed after a transaction: the lookup gives the value as of it."""
        _check_key(key)
        try:
            path, bucket, _ = type(self)._find(self, key)
        except TypeError as exc:
            raise _incomparable(key, exc) from None
        return [self] + [node for node, _ in path] + [bucket]

    def _lookup(self, key):
        """Return (value, True), or (None, False) if `key` is absent."""
        _check_key(key)
        _, _, (keys, values, _, _, _) = type(self)._find(self, key)
        try:
            index = bisect_left(keys, key)
            if index < len(keys) and not key < keys[index]:
                return values[index], True
        except TypeError as exc:
            raise _incomparable(key, exc) from None
        return None, False

    def _writable_bucket(self, key, to_remove=False):
        """Return (path, bucket, state, index, found) with `bucket` checked
        out and verified to be the one for `key`, `state` its working copy;
        None if it must start over.  `to_remove`: when the key is absent
        from the bucket as this thread sees it, it is not checked out
        (found is False; nothing else is meaningful)."""
        path, bucket, (keys, _, _, _, _) = type(self)._find(self, key)
        if to_remove:
            try:
                index = bisect_left(keys, key)
                if index == len(keys) or key < keys[index]:
                    return path, bucket, None, index, False
            except TypeError as exc:
                raise _incomparable(key, exc) from None
        checkout(bucket)
        # Its working dict, not its attributes: an insert into a big tree
        # is mostly attribute lookups otherwise.
        state = state_of(bucket)
        keys, high = state["keys"], state["high"]
        try:
            if state.get("unlinked", False) or (high is not None and not key < high):
                return None  # split or unlinked before our checkout
            index = bisect_left(keys, key)
            found = index < len(keys) and not key < keys[index]
        except TypeError as exc:
            raise _incomparable(key, exc) from None
        return path, bucket, state, index, found

    # -- reading -----------------------------------------------------------

    def __getitem__(self, key):
        value, found = type(self)._lookup(self, key)
        if not found:
            raise KeyError(key)
        return value

    def get(self, key, default=None):
        """Return the value for `key`, or `default` if it is absent."""
        value, found = type(self)._lookup(self, key)
        return value if found else default

    def __contains__(self, key):
        return type(self)._lookup(self, key)[1]

    def __len__(self):
        return _count(state_of(self)["_length"])

    def __iter__(self):
        return (key for key, _ in self._iter_range(None, None, False, False))

    def keys(self, min=None, max=None, excludemin=False, excludemax=False):
        """Return a lazy, re-iterable view of the keys in order.

        With `min` and/or `max` only keys with ``min <= key <= max`` are
        included; `excludemin`/`excludemax` make those bounds strict.
        """
        return RangeView(self, 0, min, max, excludemin, excludemax)

    def values(self, min=None, max=None, excludemin=False, excludemax=False):
        """Return a lazy view of the values in key order; see `keys`."""
        return RangeView(self, 1, min, max, excludemin, excludemax)

    def items(self, min=None, max=None, excludemin=False, excludemax=False):
        """Return a lazy view of the (key, value) pairs; see `keys`."""
        return RangeView(self, 2, min, max, excludemin, excludemax)

    def _iter_range(self, min, max, excludemin, excludemax, prefetch=False):
        """Yield (key, value) pairs inside the bounds, leaf by leaf.

        With `prefetch`, the values of each leaf are loaded together as
        it is reached (see `Database.prefetch`), for callers that use them.
        """
        jar = self._p_jar if prefetch else None
        for bound in (min, max):
            if bound is not None:
                _check_key(bound)
        # Resume point: the last key yielded, so an unlinked bucket met on
        # the way costs a fresh descent, never a repeat or a skip.
        after, exclusive = min, excludemin
        end_of = bisect_left if excludemax else bisect_right
        bucket, restarts = None, 0
        while True:
            if bucket is None:
                _, bucket, _ = type(self)._find(self, after)
            keys, values, next, _, unlinked = _walkable_bucket_state(bucket)
            if unlinked:
                restarts += 1
                if restarts > _RESTARTS:
                    raise self._gave_up(after)
                bucket = None
                continue
            start = 0
            if after is not None:
                start = _bisect(bisect_right if exclusive else bisect_left, keys, after)
            end = len(keys) if max is None else _bisect(end_of, keys, max)
            if jar is not None and end > start:
                jar.prefetch(values[start:end])
            size = len(keys)
            for at in range(start, end):
                yield keys[at], values[at]
                if len(keys) != size:
                    raise _changed_size()
            if end < size or next is None:
                return
            if end > start:
                after, exclusive, restarts = keys[end - 1], True, 0
            bucket = next

    def minKey(self, key=None):
        """Return the smallest key (at least `key`, if given).

        Raises ValueError when there is no such key.
        """
        for found, _ in self._iter_range(key, None, False, False):
            return found
        if key is None:
            raise InvalidValueError("empty OOBTree has no minimum key")
        raise InvalidValueError("no key in the OOBTree is >= %r" % (key,))

    def maxKey(self, key=None):
        """Return the largest key (at most `key`, if given).

        Raises ValueError when there is no such key.
        """
        if key is not None:
            _check_key(key)
        found = self._largest(key, True)
        if found is _MISSING:
            if key is None:
                raise InvalidValueError("empty OOBTree has no maximum key")
            raise InvalidValueError("no key in the OOBTree is <= %r" % (key,))
        return found

    def _largest(self, bound, inclusive):
        """The largest key below `bound` (None: no bound; `inclusive`: or
        equal to it), or _MISSING."""
        if bound is None:
            found = _last_key(_leaves_backwards(self._root))
            # A concurrent split may have moved keys right of the last leaf
            # its parent's state showed: scan on from there (or, having
            # found nothing in a changing tree, from the start).
            for found, _ in self._iter_range(found, None, found is not None, False):
                pass
            return _MISSING if found is None else found
        path, _, (keys, _, _, _, _) = type(self)._find(self, bound)
        index = _bisect(bisect_right if inclusive else bisect_left, keys, bound)
        if index:
            return keys[index - 1]
        # Every key here is above `bound`: take the last key below it of the
        # leaves before, then scan forward from it in case a concurrent split
        # (that _find moved right past) put keys in between.  Below it: after
        # a concurrent unlink, the positions the walk took take in this leaf.
        found = _last_key(_buckets_before(path), bound, inclusive)
        for found, _ in self._iter_range(found, bound, True, not inclusive):
            pass
        return _MISSING if found is None else found

    def __reversed__(self):
        # Without it, reversed() would index the tree by 0..len-1.
        return (key for key, _ in self._iter_backwards(None, None, False, False))

    def _iter_backwards(self, min, max, excludemin, excludemax):
        """`_iter_range` from the top down: each leaf's pairs from one state
        of it, and a fresh descent for the largest key below the last one
        yielded, so a concurrent split never repeats or skips a key."""
        for bound in (min, max):
            if bound is not None:
                _check_key(bound)
        found = self._largest(max, not excludemax)
        while found is not _MISSING:
            _, _, (keys, values, _, _, _) = type(self)._find(self, found)
            size = len(keys)
            for at in range(bisect_right(keys, found) - 1, -1, -1):
                if len(keys) != size:
                    raise _changed_size()
                key = keys[at]
                try:
                    if min is not None and (key < min or excludemin and not min < key):
                        return
                except TypeError as exc:
                    raise _incomparable(min, exc) from None
                yield key, values[at]
                found = key
            found = self._largest(found, False)

    def __eq__(self, other):
        """Equal to another OOBTree or any mapping with equal items."""
        if not isinstance(other, (OOBTree, Mapping)):
            return NotImplemented
        if other is self:
            return True
        if len(self) != len(other):
            return False
        if isinstance(other, OOBTree):
            return all(mine == theirs
                       for mine, theirs in zip(self.items(), other.items()))
        try:
            return all(other[key] == value for key, value in self.items())
        except (KeyError, TypeError):
            return False

    # Mutable and compared by value, like dict.
    __hash__ = None

    def __repr__(self):
        return "<%s.%s with %d items>" % (
            type(self).__module__, type(self).__name__, len(self))

    # -- writing -----------------------------------------------------------

    def __setitem__(self, key, value):
        type(self)._store(self, key, value, True)

    def _store(self, key, value, replace):
        """Store `value` under `key`, unless the key is there and not
        `replace`; return the key's value then.

        Decided on the bucket as checked out for the change, never on an
        earlier read: a commit landing in between must not be overwritten.
        """
        _check_key(key)
        # Methods through type(self), state through state_of: every
        # attribute of a persistent object is a Python-level lookup.
        hints = session_hints()
        hint = hints.get(id(self)) if hints else None
        if hint is not None and hint[0] is self:
            stored = _insert_hinted(hint, key, value, replace)
            if stored is not _MISSING:
                return stored
            del hints[id(self)]  # a miss: most likely the next one misses too
        writable_bucket = type(self)._writable_bucket
        tree = state_of(self)
        length, root = tree["_length"], tree["_root"]
        cleared = _clears(state_of(length))
        limit = self.max_bucket_size
        for _ in range(_RESTARTS):
            found = writable_bucket(self, key)
            if found is None:
                _await_publication(self)
                continue
            path, bucket, state, index, found = found
            keys, values = state["keys"], state["values"]
            if found:
                if replace:
                    values[index] = value
                return values[index]
            if len(keys) >= limit and not checkout_for_split(self, path, bucket):
                continue
            counter = _counter_since(length, cleared)
            if counter is None:
                cleared = _clears(state_of(length))
                continue
            keys.insert(index, key)
            values.insert(index, value)
            counter["value"] += 1
            if len(keys) > limit:
                split_bucket(self, path, bucket)
            elif index == len(keys) - 1:
                # Appended: the next key may well follow.  Kept in this
                # transaction's session (we checked out, so we joined it).
                serial = serial_at_checkout(bucket)
                low = _lower_bound(path, bucket)
                if serial == bucket._p_serial and low is not _MISSING:
                    session_hints()[id(self)] = (self, root, length, counter, bucket, state,
                                                 serial, low, limit)
            return value
        raise self._gave_up(key)

    def __delitem__(self, key):
        type(self)._remove(self, key)

    def _remove(self, key, default=_MISSING):
        """Remove `key` and return its value; if absent return `default`,
        or raise KeyError without one.  Decided on the bucket as checked
        out for the change (see `_store`)."""
        _check_key(key)
        length = state_of(self)["_length"]
        cleared = _clears(state_of(length))
        for _ in range(_RESTARTS):
            found = self._writable_bucket(key, to_remove=True)
            if found is None:
                _await_publication(self)
                continue
            path, bucket, state, index, found = found
            if not found:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            keys, values = state["keys"], state["values"]
            plan = None
            if len(keys) == 1 and path:
                plan = checkout_for_unlink(self, path, bucket)
                if plan is None:
                    continue
            counter = _counter_since(length, cleared)
            if counter is None:
                cleared = _clears(state_of(length))
                continue
            value = values[index]
            del keys[index]
            del values[index]
            counter["value"] -= 1
            if plan:
                unlink(self, path, bucket, *plan)
            return value
        raise self._gave_up(key)

    def pop(self, key, default=_MISSING):
        """Remove `key` and return its value; if absent return `default`,
        or raise KeyError when no default is given."""
        if not type(self)._lookup(self, key)[1]:
            # Absent: nothing to change (checking a bucket out would write it).
            if default is _MISSING:
                raise KeyError(key)
            return default
        return type(self)._remove(self, key, default)

    def popitem(self):
        """Remove and return the (key, value) pair with the smallest key.

        Raises KeyError when the tree is empty.
        """
        for _ in range(_RESTARTS):
            for key, _value in self._iter_range(None, None, False, False):
                value = type(self)._remove(self, key, _GONE)
                if value is not _GONE:
                    return key, value
                break  # removed meanwhile by another commit: look again
            else:
                raise KeyError("popitem(): OOBTree is empty")
        raise self._gave_up(None)

    def setdefault(self, key, default=None):
        """Return the value for `key`, first storing `default` if absent."""
        value, found = type(self)._lookup(self, key)
        if found:
            return value
        return type(self)._store(self, key, default, False)

    def update(self, other=(), /, **kwargs):
        """Store every item of `other` (a mapping, or an iterable of
        pairs) and then of `kwargs`, like dict.update."""
        for key, value in _pairs_of(other):
            self[key] = value
        for key, value in kwargs.items():
            self[key] = value

    def clear(self):
        """Remove every item.

        Usually rewrites only the tree object and the `Length` counter:
        the old buckets are dropped whole, whatever the size.  Buckets
        this transaction created and changed are instead emptied one by
        one, and so is every bucket if it changed the tree's size already.
        """
        length = self._length
        # A commit installs states in checkout order, and other writers must
        # not see the counter cleared before the new root: so the counter is
        # checked out after the tree, or the slow way is taken.
        if not all_droppable(self._root) or checked_out(length):
            for key in list(self.keys()):
                type(self)._remove(self, key, None)  # one removed meanwhile is gone all the same
            return
        checkout(self)
        self._root = Bucket()
        # Same counter, marked: a concurrent insert or delete that lands
        # in the dropped buckets changes it too, and so conflicts rather
        # than commit an item nothing can reach (see _counter_since).
        checkout(length)
        counter = state_of(length)
        counter["value"] = 0
        counter["cleared"] = _clears(counter) + 1

MutableMapping.register(OOBTree)
