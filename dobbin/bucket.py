"""The B-tree's persistent pieces, how readers see them, and how their
concurrent changes merge.

`Bucket` (a leaf: sorted keys, parallel values, a `next` link and a `high`
bound), `Node` (separator keys and children) and `Length` (the item
count) are what `dobbin.btree.OOBTree` stores; `RangeView` is what its
keys(), values() and items() return, and `_check_key` what it accepts.  Each is its own record,
so a change rewrites one small piece; `_p_resolve_conflict` on `Bucket`
and `Length` lets concurrent changes of different keys both commit.
Readers take each piece's state as one dict (`_bucket_state`,
`_node_state`), which a concurrent commit replaces but never changes.
"""

import pickle
import struct
from bisect import bisect_left, bisect_right

from dobbin.exc import ConflictError, InvalidTypeError
from dobbin.persistent import Persistent, checkout, committed_state, state_of, working_copy
from dobbin.serialize import PROTOCOL
from dobbin.session import checkout_base, serial_at_checkout

_MISSING = object()


def _same_ref(a, b):
    """Are `a` and `b` the same persistent object (or both None)?"""
    if a is b:
        return True
    oid = getattr(a, "_p_oid", None)
    return oid is not None and oid == getattr(b, "_p_oid", None)


def _same_value(a, b):
    """Is `b` unchanged from `a`: the same content, not merely equal?

    Equal values can differ (0.0 and -0.0, one instant in two time zones,
    Decimal 1.0 and 1.00): a merge that took the one for the other would
    undo a committed change.  Unsure means changed (safe: a conflict).
    """
    if a is b:
        return True
    if a is _MISSING or b is _MISSING:
        return False
    try:
        return _same_content(a, b)
    except RecursionError:
        return False


# Types whose equal values have the same content.
_EXACT = frozenset((str, bytes, int, bool, type(None)))
_DOUBLE = struct.Struct("<d")


def _same_content(a, b):
    if a is b:
        return True
    kind = type(a)
    if type(b) is not kind:
        return False
    if kind in _EXACT:
        return a == b
    if kind is float:
        return _DOUBLE.pack(a) == _DOUBLE.pack(b)  # tells -0.0 from 0.0
    if isinstance(a, Persistent):
        return _same_ref(a, b)
    if kind is list or kind is tuple:
        return len(a) == len(b) and all(map(_same_content, a, b))
    if kind is dict:  # the same items in the same order
        return (len(a) == len(b) and all(map(_same_content, a, b))
                and all(map(_same_content, a.values(), b.values())))
    # Anything else: the same pickle is the same content.  Sets whose
    # order differs, or values holding persistent objects, count as changed.
    try:
        return pickle.dumps(a, PROTOCOL) == pickle.dumps(b, PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError, ValueError):
        return False


class TreePart(Persistent):
    """A B-tree or one of its pieces.  Their own methods check them out, so
    one that no stored object reaches at commit is a scratch object, not
    one left out by mistake: the commit keeps it out (and its changes
    stay its own) rather than failing (session._scratch)."""

    _p_checks_itself_out = True


class Length(TreePart):
    """A persistent integer counter whose concurrent changes merge.

    `value` is the count.  Transactions that change it concurrently do
    not conflict: each one's delta is added to the committed value.
    """

    def __init__(self, value=0):
        self.value = value

    def __call__(self):
        """Return the current value."""
        return self.value

    def change(self, delta):
        """Add `delta` to the value, checking the counter out first."""
        checkout(self)
        state_of(self)["value"] += delta  # one lookup, not a get and a set

    def _p_resolve_conflict(self, old, saved, new):
        """Merge two concurrent changes: old + (saved - old) + (new - old).

        A tree's `clear` bumps `cleared`: a change counted in the buckets
        it dropped conflicts, and a clear drops the other's change whole.
        """
        cleared = old.get("cleared", 0)
        if saved.get("cleared", 0) != cleared:
            raise ConflictError(oid=self._p_oid, class_name=type(self).__name__)
        if new.get("cleared", 0) != cleared:
            return dict(new)
        try:
            value = saved["value"] + new["value"] - old["value"]
        except (KeyError, TypeError):
            raise ConflictError(oid=self._p_oid,
                                class_name=type(self).__name__) from None
        resolved = dict(new)
        resolved["value"] = value
        return resolved


def _clears(counter_state):
    """How many times the tree of a `Length` state was cleared."""
    return counter_state.get("cleared", 0)


def _count(length):
    """The number of items the calling thread sees in the tree of `length`.

    A thread's working copy of the counter is fixed at its checkout, while
    the buckets it has not checked out go on taking other threads' commits:
    so it counts the committed value plus its own changes (which merge so
    at commit), or only its own after it cleared the tree.
    """
    working = state_of(length)
    base = checkout_base(length)
    if base is None:
        return working["value"]  # not checked out: the committed value
    if _clears(working) != _clears(base):
        return max(0, working["value"])
    committed = committed_state(length)
    return max(0, committed["value"] + working["value"] - base["value"])


def _counter_since(length, cleared):
    """`length` checked out, its working state; None if a clear committed
    since the writer read `cleared` (the bucket it found may be dropped).

    Either the writer sees the clear now and starts over, or the clear
    commits after this checkout and the commit conflicts on the counter.
    """
    checkout(length)
    counter = state_of(length)
    return counter if _clears(counter) == cleared else None


class Bucket(TreePart):
    """A leaf of an `OOBTree`: `keys`, `values`, `next`, `high`.

    Only `OOBTree` should create or change buckets.  Concurrent changes to
    different keys of one bucket merge at commit (see `_p_resolve_conflict`).
    """

    # Set on a bucket cut out of its tree, so stale readers start over.
    unlinked = False
    # Counts the splits and unlinks that changed its `next` or `high`: a
    # split undone by an unlink gives the same shape back, but a thread
    # holding a copy from before sent keys of the copy to the other bucket.
    reshaped = 0

    def __init__(self, keys=(), values=(), next=None, high=None):
        self.keys = list(keys)
        self.values = list(values)
        self.next = next
        self.high = high

    def _p_resolve_conflict(self, old, saved, new):
        """Three-way merge of a bucket's state dicts, or ConflictError.

        `old` is the state both transactions started from, `saved` the one
        committed meanwhile, `new` ours.  Changes to different keys merge.
        Refused: both sides changed the same key; either side changed
        `next`, `high` or `unlinked` (a split or an unlink, which other
        objects depend on), even if back again (`reshaped` counts those
        changes); either side emptied the bucket; or the merge
        would empty it (an empty bucket should have been unlinked).  A
        merged bucket may exceed the size limit until the next insert
        into it splits it.
        """
        oid = self._p_oid

        def refuse(reason):
            return ConflictError(
                "cannot merge concurrent changes to bucket oid %s: %s"
                % (oid, reason), oid=oid, class_name=type(self).__name__)

        try:
            reshaped = not (_same_place(old, saved) and _same_place(old, new))
            sides = [(state["keys"], state["values"])
                     for state in (old, saved, new)]
        except (KeyError, TypeError, AttributeError):
            raise refuse("unexpected state layout") from None
        if reshaped:
            raise refuse("the bucket was split or unlinked")
        if sides[0][0] and not (sides[1][0] and sides[2][0]):
            raise refuse("the bucket was emptied")
        try:
            keys, values = _merge_sorted(*sides)
        except TypeError as exc:
            raise refuse("keys do not compare: %s" % exc) from None
        except _BothChanged as exc:
            raise refuse("both transactions changed key %r" % (exc.args[0],)) \
                from None
        if not keys:
            raise refuse("the merge would empty the bucket")
        resolved = dict(new)
        resolved["keys"] = keys
        resolved["values"] = values
        return resolved


class _BothChanged(Exception):
    """Internal: both sides of a merge changed one key."""


def _merge_sorted(old, saved, new):
    """Three-way merge of sorted (keys, values) pairs; see Bucket."""
    sides = (old, saved, new)
    positions = [0, 0, 0]
    out_keys, out_values = [], []
    while True:
        heads = [keys[positions[n]] for n, (keys, _) in enumerate(sides)
                 if positions[n] < len(keys)]
        if not heads:
            return out_keys, out_values
        key = min(heads)
        found = []
        for n, (keys, values) in enumerate(sides):
            at = positions[n]
            # key is the smallest head, so "not key < head" means equal.
            if at < len(keys) and not key < keys[at]:
                found.append(values[at])
                positions[n] += 1
            else:
                found.append(_MISSING)
        before, theirs, ours = found
        if _same_value(before, theirs):
            chosen = ours
        elif _same_value(before, ours):
            chosen = theirs
        else:
            raise _BothChanged(key)
        if chosen is not _MISSING:
            out_keys.append(key)
            out_values.append(chosen)


class Node(TreePart):
    """An interior node of an `OOBTree`: separator `keys` and `children`.

    Only `OOBTree` should create or change nodes.  Nodes change only when a
    child splits or is unlinked; concurrent changes to one node conflict.
    """

    def __init__(self, keys=(), children=()):
        self.keys = list(keys)
        self.children = list(children)


# -- reading: one consistent state per piece (see dobbin.btree) ------------


def _bucket_state(bucket):
    """Return (keys, values, next, high, unlinked) from one state."""
    state = state_of(bucket)  # one dict: one consistent state
    return (state["keys"], state["values"], state["next"], state["high"],
            state.get("unlinked", False))


def _walkable_bucket_state(bucket):
    """`_bucket_state`, or ConflictError if it is this thread's copy of a
    bucket that another commit has since restructured.

    A walk along `next` links through such a stale copy can skip keys,
    or loop at an unlinked bucket.  Its transaction cannot commit either
    (`Bucket._p_resolve_conflict` refuses changed shapes), unless a
    savepoint rollback drops the copy first.  Lookups, which end at the
    copy, read it as this thread's view.
    """
    copy = working_copy(bucket)
    if copy is not None and serial_at_checkout(bucket) not in (None, bucket._p_serial):
        if not _same_place(copy, committed_state(bucket)):
            oid = bucket._p_oid
            raise ConflictError(
                "bucket oid %s was split or unlinked by another commit since "
                "this transaction checked it out" % (oid,), oid=oid,
                class_name=type(bucket).__name__)
    return _bucket_state(bucket)


def _same_place(state, other):
    """Do two states of a bucket hold the same place in the tree: the same
    `next` and `high`, unlinked alike, and split or unlinked as often?"""
    return (_same_ref(state["next"], other["next"]) and _same_value(state["high"], other["high"])
            and state.get("unlinked", False) == other.get("unlinked", False)
            and state.get("reshaped", 0) == other.get("reshaped", 0))


def _node_state(node):
    """Return (keys, children) from one state; no children: unlinked."""
    state = state_of(node)
    return state["keys"], state["children"]


def _index_of(children, child):
    """Position of `child` (by identity) in `children`, or -1."""
    for index, candidate in enumerate(children):
        if candidate is child:
            return index
    return -1


def _leaves_backwards(node):
    """Yield the buckets under `node`, last first."""
    if isinstance(node, Node):
        for child in reversed(_node_state(node)[1]):
            yield from _leaves_backwards(child)
    else:
        yield node


def _buckets_before(path):
    """Yield the buckets left of the one `path` leads to, nearest first."""
    for node, index in reversed(path):
        for child in reversed(_node_state(node)[1][:index]):
            yield from _leaves_backwards(child)


def _last_key(buckets, bound=None, inclusive=False):
    """The largest key below `bound` (None: no bound; `inclusive`: or equal
    to it) of the first of `buckets` that holds one, or None."""
    for bucket in buckets:
        keys = _bucket_state(bucket)[0]
        at = (len(keys) if bound is None
              else (bisect_right if inclusive else bisect_left)(keys, bound))
        if at:
            return keys[at - 1]
    return None


_PLAIN_KEYS = frozenset((int, str, bytes))


def _check_key(key):
    """Raise TypeError unless `key` is immutable and totally ordered."""
    if type(key) in _PLAIN_KEYS:
        return  # the common case, and fine
    if key is None:
        raise InvalidTypeError("OOBTree keys may not be None")
    try:
        hash(key)
    except TypeError:
        # A key changed in place would leave its bucket out of order.
        raise InvalidTypeError("OOBTree keys must be immutable; %r (%s) is not hashable"
                               % (key, type(key).__name__)) from None
    try:
        key < key
    except (TypeError, ArithmeticError):  # ArithmeticError: a Decimal NaN
        raise InvalidTypeError("OOBTree keys must be totally ordered; %r (%s) has "
                               "no ordering" % (key, type(key).__name__)) from None
    unordered = _unordered_part(key)
    if unordered is not None:
        raise InvalidTypeError("OOBTree keys must be totally ordered; %r in key %r is not (a NaN, "
                               "or a set, which is ordered by inclusion)" % (unordered, key))


def _unordered_part(key):
    """A part of `key`, or `key` itself, that breaks a total order: a NaN
    (unequal to itself) or a frozenset, alone or anywhere in a tuple
    (or a tuple's subclass)."""
    parts = [key]
    while parts:
        part = parts.pop()
        if isinstance(part, tuple):  # a namedtuple compares as one
            parts.extend(part)
        elif isinstance(part, frozenset):
            return part
        else:
            try:
                if part != part:
                    return part
            except (TypeError, ArithmeticError):
                return part
    return None


class RangeView:
    """A lazy, re-iterable view of an `OOBTree`'s keys, values or items
    within optional bounds, reflecting the tree as it is when iterated.
    `len()` is O(1) without bounds and counts the range otherwise.
    """

    _kinds = ("keys", "values", "items")

    def __init__(self, tree, kind, min, max, excludemin, excludemax):
        self._tree = tree
        self._kind = kind
        self._bounds = (min, max, excludemin, excludemax)

    def __iter__(self):
        return self._shaped(self._tree._iter_range(*self._current_bounds(),
                                                   prefetch=self._kind != 0))

    def __reversed__(self):
        return self._shaped(self._tree._iter_backwards(*self._current_bounds()))

    def _current_bounds(self):
        """The bounds, where an excluded bound of None means, as in BTrees,
        "leave out the smallest (largest) key": that key, as of now."""
        min, max, excludemin, excludemax = self._bounds
        if min is None and excludemin:
            for min, _ in self._tree._iter_range(None, None, False, False):
                break
        if max is None and excludemax:
            for max, _ in self._tree._iter_backwards(None, None, False, False):
                break
        return min, max, excludemin, excludemax

    def _shaped(self, pairs):
        """The view's kind of items from (key, value) pairs."""
        if self._kind == 0:
            return (key for key, _ in pairs)
        if self._kind == 1:
            return (value for _, value in pairs)
        return pairs

    def __len__(self):
        bounds = self._current_bounds()
        if bounds[:2] == (None, None):
            return len(self._tree)
        return sum(1 for _ in self._tree._iter_range(*bounds))

    def __contains__(self, item):
        if self._kind == 0:
            min, max, excludemin, excludemax = self._current_bounds()
            _check_key(item)
            try:
                if min is not None and (item < min or excludemin
                                        and not min < item):
                    return False
                if max is not None and (max < item or excludemax
                                        and not item < max):
                    return False
            except TypeError as exc:
                raise InvalidTypeError("%r (%s) cannot be compared with the bounds of this range, "
                                       "%r and %r: %s" % (item, type(item).__name__, min, max, exc)
                                       ) from None
            return item in self._tree
        return any(item == found for found in self)

    def __repr__(self):
        min, max, excludemin, excludemax = self._bounds
        return ("<OOBTree %s view min=%r max=%r excludemin=%r excludemax=%r>"
                % (self._kinds[self._kind], min, max, excludemin, excludemax))
