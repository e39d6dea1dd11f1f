"""Values of requests, as the server takes them: keys resolved, and checked.

A request's values (a commit's fields and items, a call's arguments, a
search's query) arrive decoded, with keys where they name objects.  The
server resolves the keys to the objects and refuses, before anything is
stored, what it could store but never send back.  It compares a client's
old values with the current ones by `same_value`.
"""

import struct
from collections import Counter

from broker.codec import ABSENT, MAX_DEPTH
from broker.exc import DecodeError, EncodeError, ProtocolError
from broker.export import hidden_item
from broker.keys import MAC_SIZE, MAX_PART_LEN, Key
from dobbin.btree import OOBTree
from dobbin.bucket import Bucket, Length, Node
from dobbin.persistent import Persistent, PersistentDict, PersistentFile, state_of
from dobbin.session import transaction_checkouts
from dobbin.stream import PersistentStream

# Stand in for the keys in a record whose size is checked: the longest an
# object's key gets, and the id and MAC of a stream's.
_PLACEHOLDER_OID = 2 ** 63 - 1
_PLACEHOLDER_KEY = Key("o", _PLACEHOLDER_OID, bytes(MAC_SIZE))
# The largest request id and server number a reply carries: a record must
# fit in the reply that sends it.
_LARGEST_ID = 2 ** 64 - 1
# A stored file is a stream once its commit publishes it.
STREAMS = (PersistentStream, PersistentFile)

# Values nest this deep at most: a reply nests a value a few levels into
# its message, and the codec sends MAX_DEPTH levels.
MAX_VALUE_DEPTH = MAX_DEPTH - 4

_SCALARS = frozenset({str, bytes, bool, float, int, type(None)})
_CONTAINERS = frozenset({list, dict, tuple, set, frozenset})
# Floats are compared by their bits: NaN is then itself, and -0.0 is not 0.0.
_FLOAT = struct.Struct("<d")


def resolve_values(value, resolve_key, memo=None, storing=False):
    """A copy of decoded `value` with each key replaced by `resolve_key(key)`.

    The value itself is left as it came: a commit retried after a store
    conflict resolves it again, against that attempt's new objects.
    `memo` (id -> copy) keeps shared and cyclic parts so.

    Refused with ProtocolError: ABSENT (the top of an old value may be
    it; callers take that case first), a type the codec does not send (a
    msgpack Timestamp), nesting past MAX_VALUE_DEPTH and, when `storing`,
    a static object (it is not in the database).
    """
    return _resolve(value, resolve_key, {} if memo is None else memo, storing, 0)


def _resolve(value, resolve_key, memo, storing, depth):
    t = type(value)
    if t in _SCALARS:
        return value
    if t is Key:
        obj = resolve_key(value)
        if storing and value.kind == "s" and not isinstance(obj, Persistent):
            raise ProtocolError("the static object %s is not in the database and "
                                "cannot be stored" % value)
        return obj
    if t not in _CONTAINERS:
        raise ProtocolError("a request value cannot be %s"
                            % ("ABSENT" if value is ABSENT else "a " + t.__name__))
    done = memo.get(id(value))
    if done is not None:
        return done
    if depth >= MAX_VALUE_DEPTH:
        raise ProtocolError("a request value is nested deeper than %d levels"
                            % MAX_VALUE_DEPTH)
    depth += 1
    if t is list:
        result = memo[id(value)] = []  # before its items, which may refer to it
        result.extend(_resolve(x, resolve_key, memo, storing, depth) for x in value)
        return result
    if t is dict:
        result = memo[id(value)] = {}
        for k, v in value.items():
            k, v = (_resolve(k, resolve_key, memo, storing, depth),
                    _resolve(v, resolve_key, memo, storing, depth))
            try:
                result[k] = v
            except TypeError:
                raise _unhashable(k, "as a dict key") from None
        return result
    items = [_resolve(x, resolve_key, memo, storing, depth) for x in value]
    if t is not tuple:
        for item in items:
            try:
                hash(item)
            except TypeError:
                raise _unhashable(item, "in a " + t.__name__) from None
    result = memo[id(value)] = t(items)
    return result


def _unhashable(obj, place):
    # A key naming a mapping is unhashable here.  Its type only: a repr
    # could show what clients may not read.
    return ProtocolError("a request value cannot hold an object of type %s %s: it is "
                         "unhashable" % (type(obj).__name__, place))


def not_a_key(where, item, error):
    """The ProtocolError for resolved `item`, which TypeError `error` says
    cannot be a key of the mapping named `where` (unhashable, or not
    ordered with a B-tree's keys).  The error's text shows the item's
    repr: passed on only for plain data, which the client sent itself;
    an object's repr could show what clients may not read."""
    reason = str(error) if _plain(item) else (
        "an object of type %s is unhashable, or not ordered with the keys there"
        % type(item).__name__)
    return ProtocolError("the item cannot be a key of %s: %s" % (where, reason))


def _plain(value):
    if type(value) in _SCALARS:
        return True
    return type(value) in (tuple, frozenset) and all(map(_plain, value))


def new_object(cls):
    """A new `cls` object for a client's commit.  Its __init__ is not run:
    the client supplies the fields, and defaults belong in class
    attributes.  But a Dobbin mapping's base __init__ is, with no
    arguments: its items live in structures that makes."""
    obj = cls.__new__(cls)
    for mapping in (OOBTree, PersistentDict):
        if isinstance(obj, mapping):
            mapping.__init__(obj)
            break
    return obj


class Touched(list):
    """The objects a commit changed, its new objects by the client's
    numbers (`created`), and the (mapping key, item, value) it writes
    into mappings (`items`)."""

    def __init__(self, objects=(), items=()):
        super().__init__(objects)
        self.created = {}
        self.items = list(items)


def check_sendable(touched, exports, codec):
    """Raise ProtocolError if the state record of one of the objects a
    commit `touched` (as the calling thread has them), or one of its
    `items`, as a page of it alone, would not reach a client: a commit
    that made one so would leave it unreadable for every client.

    Each is encoded with `codec` (whose `default` is `placeholder_key`)
    in the reply that would carry it, and decoded again: the decoder
    counts a shared part wherever it occurs, as a client's does."""
    for obj in touched:
        rules = exports.lookup(type(obj))
        try:
            state = streams_as_keys(rules.filter_state(state_of(obj)), _PLACEHOLDER_OID,
                                    _placeholder_stream_key)
            check_reply(codec, {"class": rules.name, "serial": _LARGEST_ID, "state": state})
        except (EncodeError, DecodeError) as error:
            raise ProtocolError("the commit would leave %s unsendable: %s"
                                % (rules.name, error)) from None
    for key, item, value in touched.items:
        # Each alone: a part it shares with another item may come first in
        # one message and be refused in another (a cycle through a tuple).
        try:
            check_reply(codec, {"items": [[item, value]], "more": False, "len": _LARGEST_ID,
                                "deps": None})
        except (EncodeError, DecodeError) as error:
            raise ProtocolError("the commit would store an item of %s that cannot be sent: "
                                "%s" % (key, error)) from None


def check_reply(codec, result):
    """Raise EncodeError or DecodeError unless `codec` can send `result`
    in a reply that a client can decode."""
    codec.decode(codec.encode({"id": _LARGEST_ID, "srv": _LARGEST_ID, "ok": result}))


def streams_as_keys(state, oid, stream_key):
    """`state` (a record's, a copy), each stream attribute replaced by the
    key clients read it by, `stream_key(oid, name)`.  A stream anywhere
    else (inside a list, say) cannot be sent: see `placeholder_key`."""
    for name, value in state.items():
        if isinstance(value, STREAMS):
            if len(name) > MAX_PART_LEN:
                raise EncodeError("the name of a stream attribute may have at most %d "
                                  "characters, not %d (%s...)"
                                  % (MAX_PART_LEN, len(name), name[:20]))
            state[name] = stream_key(oid, name)
    return state


def _placeholder_stream_key(oid, name):
    return Key("f", (oid, name), bytes(MAC_SIZE))


def changed_in_transaction(database, exports):
    """A `Touched` of what the calling thread's transaction changed in
    `database`, for `check_sendable` before an application method's
    commit: the objects it checked out and the new objects clients can
    reach from them.  Mappings count as their new or changed items, which
    clients read page by page; a B-tree's buckets as their items alone.
    What `exports` hides from clients is left out: it is never sent."""
    touched = Touched()
    seen, pending = set(), []
    for entry in transaction_checkouts(database):
        seen.add(id(entry.obj))
        _add_changes(touched, entry.obj, entry.old, pending, exports)
    while pending:
        obj = pending.pop()
        if id(obj) not in seen:
            seen.add(id(obj))
            _add_changes(touched, obj, None, pending, exports)
    return touched


def _add_changes(touched, obj, old, pending, exports):
    """Add `obj`'s changes since state `old` (None: it is new) to
    `touched`, and the new objects clients can reach from it to `pending`."""
    state = state_of(obj)
    if isinstance(obj, (Bucket, Node, Length)):
        # Tree internals: no client reads them, only a bucket's items.
        items = before = ()
        if isinstance(obj, Bucket):
            items = zip(state["keys"], state["values"])
            before = zip(old["keys"], old["values"]) if old else ()
        reachable = state
    else:
        rules = exports.lookup(type(obj))
        touched.append(obj)  # its attributes
        reachable = rules.filter_state(state)
        items = before = ()
        if isinstance(obj, PersistentDict):
            # .get: server.obj_new makes objects without running __init__.
            items = [(item, value) for item, value in state.get("_data", {}).items()
                     if not hidden_item(rules, item)]
            before = old.get("_data", {}).items() if old else ()
            reachable = [reachable, dict(items)]
    was = dict(before)
    description = "a %s" % type(obj).__name__
    touched.items.extend((description, item, value) for item, value in items
                         if item not in was or not same_value(was[item], value))
    _find_new(reachable, pending)


def _find_new(state, pending):
    """Add the new persistent objects inside `state` to `pending`."""
    stack, visited = [state], set()
    while stack:
        value = stack.pop()
        if isinstance(value, Persistent):
            if value._p_oid is None:
                pending.append(value)
        elif type(value) in _CONTAINERS and id(value) not in visited:
            visited.add(id(value))  # shared and cyclic parts once
            stack.extend(value)
            if type(value) is dict:
                stack.extend(value.values())


def placeholder_key(value):
    """`_PLACEHOLDER_KEY` for a persistent object, else None."""
    if isinstance(value, Persistent):
        return _PLACEHOLDER_KEY
    if isinstance(value, STREAMS):
        raise stream_not_attribute()
    return None


def stream_not_attribute():
    return EncodeError("a stream can be sent only as an attribute of its own, "
                       "not inside a list, a dict or another value")


def as_sent(item, key_of):
    """Mapping `item` as its client knows it, for an error: each object in
    it as `key_of(object)` (a repr of the object would show its fields and
    server address).  Items are hashable: objects, tuples, frozensets, scalars."""
    t = type(item)
    if t is tuple or t is frozenset:
        return t(as_sent(x, key_of) for x in item)
    return item if t in _SCALARS else key_of(item)


def same_value(a, b):
    """Is the current value `a` the value `b` a client read?  Unsure means no.

    Type-strict at every level, as clients see values: 1, 1.0 and True
    differ, 0.0 and -0.0 too, a NaN is the same as a NaN with its bits,
    dicts differ in the order of their keys, and sets are compared as
    multisets of stand-ins (a set may hold two NaNs, equal to nothing).
    """
    try:
        return _same(a, b, 0, {})
    except Exception:  # an exotic __eq__ or __hash__: treat as changed, which is safe
        return False


def _same(a, b, depth, seen):
    """`same_value` for `a` and `b` inside `depth` containers.  `seen` maps
    (id(a), id(b)) of containers already compared to the answer."""
    if a is b:
        return True
    if a is ABSENT or b is ABSENT:
        return False
    if isinstance(a, Persistent) or isinstance(b, Persistent):
        oid = getattr(a, "_p_oid", None)
        return oid is not None and oid == getattr(b, "_p_oid", None)
    t = type(a)
    if t is not type(b):
        return False
    if t is float:
        return _FLOAT.pack(a) == _FLOAT.pack(b)
    if t not in _CONTAINERS:
        return bool(a == b)
    if depth >= MAX_VALUE_DEPTH:
        return False  # deeper than a client can send: not what it read
    pair = (id(a), id(b))
    if pair in seen:
        return seen[pair]
    # Assumed while the parts are compared: cyclic values are the same when
    # they unfold alike.  Every other answer is a conjunction, so a wrong
    # assumption makes the whole comparison false, whatever was cached.
    seen[pair] = True
    depth += 1
    if len(a) != len(b):
        result = False
    elif t is set or t is frozenset:
        result = _members(a, depth) == _members(b, depth)
    elif t is dict:
        result = all(_same(k, j, depth, seen) and _same(v, w, depth, seen)
                     for (k, v), (j, w) in zip(a.items(), b.items()))
    else:
        result = all(_same(x, y, depth, seen) for x, y in zip(a, b))
    seen[pair] = result
    return result


def _members(value, depth):
    """The members of set or frozenset `value`, as a multiset of stand-ins."""
    return frozenset(Counter(_stand_in(x, depth) for x in value).items())


def _stand_in(value, depth):
    """A hashable stand-in for a set member inside `depth` containers: two
    members are the same value (as `_same` has it) just when their
    stand-ins are equal.  Members are hashable, so never cyclic."""
    if isinstance(value, Persistent):
        oid = value._p_oid
        return (Persistent, oid) if oid is not None else (Persistent, None, id(value))
    t = type(value)
    if t is float:
        return (float, _FLOAT.pack(value))
    if t is tuple or t is frozenset:
        if depth >= MAX_VALUE_DEPTH:
            return object()  # equal to nothing: deeper than a client can send
        if t is tuple:
            return (tuple, tuple(_stand_in(x, depth + 1) for x in value))
        return (frozenset, _members(value, depth + 1))
    return (t, value)
