"""msgpack encoding of broker messages, with shared and cyclic structures.

Plain values travel as plain msgpack: None, bool, int (64 bit), float, str,
bytes, lists and str-keyed dicts.  Everything else is a msgpack extension
type whose payload is itself msgpack (docs/protocol.txt has the table):

    1  TUPLE      packed list of the items
    2  SET        packed list of the items
    3  FROZENSET  packed list of the items
    4  DICT       dict with a key that is not str: packed flat [k1, v1, k2, v2 ...]
    5  DEF        a container that occurs more than once in the message:
                  4-byte big-endian number, 1-byte kind (l t d D s f, see
                  _KINDS), then the container as above
    6  REF        4-byte number of a DEF seen earlier in the message
    7  KEY        object key: 1-byte kind, MAC, packed ident (broker.keys)
    8  ABSENT     empty payload: "no value" (an attribute that is not set)

A container that occurs once is sent as itself, so messages without sharing
are ordinary msgpack.  A container that occurs twice or more is sent once as
DEF and then as REF, which carries both sharing and cycles.  A cycle through
a tuple or frozenset cannot be rebuilt (the container would have to exist
before its items) and is refused when encoding.

Decoding never runs code chosen by the sender: unknown extension codes,
map keys other than str and bin in plain maps, oversize strings, arrays
and maps, too deep nesting, trailing bytes and more than `max_items`
items all raise DecodeError.  Nothing here imports pickle.

Items are counted alike when encoding and decoding, as they travel: each
member of an array (a list, or the payload of a tuple, a set or a dict with
a key that is not str: its keys and values) and each entry of a map, and an
empty container as one (so that a message of empty containers counts too).
A shared container counts once when encoding, and wherever it occurs when
decoding (see _DecodeState._count).
"""

import struct
import threading

import msgpack
from zope.interface import implementer

from broker.exc import AccessDenied, DecodeError, EncodeError
from broker.interfaces import ICodec
from broker.keys import MAC_SIZE, Key

EXT_TUPLE, EXT_SET, EXT_FROZENSET, EXT_DICT, EXT_DEF, EXT_REF, EXT_KEY, EXT_ABSENT = range(1, 9)

MAX_MESSAGE = 16 * 1024 * 1024
MAX_DEPTH = 64
MAX_ITEMS = 1000000
_KEEP_PACKER = 1024 * 1024
_INT_MIN, _INT_MAX = -2 ** 63, 2 ** 64 - 1
_NUM = struct.Struct(">I")
_PLAIN = (str, bytes, bool, float, type(None))
_CONTAINERS = (list, tuple, dict, set, frozenset)
_KINDS = {list: b"l", tuple: b"t", dict: b"D", set: b"s", frozenset: b"f"}


class _Absent:
    """The ABSENT marker: no value at all (not even None)."""

    __slots__ = ()
    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "ABSENT"

    def __reduce__(self):
        return (_Absent, ())


ABSENT = _Absent()
_ABSENT_EXT = msgpack.ExtType(EXT_ABSENT, b"")


@implementer(ICodec)
class Codec:
    """Encoder and decoder for one side of a connection.

    `default(obj)` is called for any value the codec cannot send as is and
    must return a Key (or raise EncodeError); the server uses it to turn
    persistent objects into signed keys, the client to turn proxies into
    their keys.  `on_key(key)` is called for every Key decoded and its result
    replaces the key; the server uses it to verify MACs, the client to make
    proxies.
    """

    def __init__(self, default=None, on_key=None, max_message=MAX_MESSAGE,
                 max_depth=MAX_DEPTH, max_items=MAX_ITEMS, key_cache=0):
        self.default = default
        self.on_key = on_key
        self.max_message = max_message
        self.max_depth = max_depth
        self.max_items = max_items
        # With key_cache > 0, on_key is a pure function of the key's bytes
        # (the server's MAC check): its results are remembered by payload,
        # for the keys decoded and for the keys encoded (which are likely to
        # come back).
        self.key_cache = key_cache
        self._keys = {}

    # -- encoding ---------------------------------------------------------

    def encode(self, value):
        try:
            converted = _flat_map(value) if self.max_depth > 0 else None
            if converted is None:
                try:
                    # Most other messages are simple: convert them in one pass.
                    converted = self._convert_simple(value, _SimpleState(), 0)
                except _NotSimple:
                    converted = self._convert(value, _EncodeState(self._shared(value)), 0)
            elif (len(converted) or 1) > self.max_items:
                raise EncodeError("value has more than %d items" % self.max_items)
            else:
                for k, v in converted.items():
                    if type(v) is Key:
                        converted[k] = self._convert_other(v, Key)
            data = _pack(converted)
        except (OverflowError, ValueError, TypeError) as e:
            raise EncodeError("cannot encode message: %s" % e) from None
        except RuntimeError as e:
            # A dict or set another thread changed as it was read.
            raise EncodeError("cannot encode message: a value changed while it was being "
                              "encoded (%s)" % e) from None
        if len(data) > self.max_message:
            raise EncodeError("message of %d bytes exceeds the limit of %d"
                              % (len(data), self.max_message))
        return data

    def _shared(self, value):
        """Return the ids of containers reached more than once from `value`."""
        seen = {}
        shared = set()
        count = 0
        stack = [(value, 0)]
        while stack:
            obj, depth = stack.pop()
            if type(obj) not in _KINDS:
                continue
            i = id(obj)
            if i in seen:
                shared.add(i)
                continue
            seen[i] = obj
            if depth >= self.max_depth:
                raise EncodeError("value nested deeper than %d levels" % self.max_depth)
            count += _items(obj) or 1
            if count > self.max_items:
                raise EncodeError("value has more than %d items" % self.max_items)
            depth += 1
            if type(obj) is dict:
                for k, v in obj.items():
                    stack.append((k, depth))
                    stack.append((v, depth))
            else:
                stack.extend((x, depth) for x in obj)
        return shared

    def _convert_simple(self, obj, state, depth):
        """_convert for a simple value: no container occurs twice, every dict key is str.

        Raises _NotSimple otherwise.  Plain items are handled in line: most
        values are flat records of them.
        """
        t = type(obj)
        if t in _PLAIN:
            return obj
        if t is int:
            if not _INT_MIN <= obj <= _INT_MAX:
                raise EncodeError("an integer outside the 64-bit range (%d bits)"
                                  % obj.bit_length())
            return obj
        if t not in _KINDS:
            return self._convert_other(obj, t)
        i = id(obj)
        if i in state.seen:
            raise _NotSimple
        state.seen.add(i)
        if depth >= self.max_depth:
            raise EncodeError("value nested deeper than %d levels" % self.max_depth)
        state.count += len(obj) or 1  # no dict key here is other than str
        if state.count > self.max_items:
            raise EncodeError("value has more than %d items" % self.max_items)
        depth += 1
        convert = self._convert_simple
        if t is dict:
            body = {}
            for k, v in obj.items():
                if type(k) is not str:
                    raise _NotSimple
                tv = type(v)
                if tv in _PLAIN or (tv is int and _INT_MIN <= v <= _INT_MAX):
                    body[k] = v
                else:
                    body[k] = convert(v, state, depth)
            return body
        body = [x if type(x) in _PLAIN else convert(x, state, depth) for x in obj]
        if t is list:
            return body
        code = EXT_TUPLE if t is tuple else EXT_SET if t is set else EXT_FROZENSET
        return msgpack.ExtType(code, _pack(body))

    def _convert(self, obj, state, depth):
        t = type(obj)
        if t in _PLAIN:
            return obj
        if t is int:
            if not _INT_MIN <= obj <= _INT_MAX:
                raise EncodeError("an integer outside the 64-bit range (%d bits)"
                                  % obj.bit_length())
            return obj
        if t in _KINDS:
            return self._convert_container(obj, t, state, depth)
        return self._convert_other(obj, t)

    def _convert_other(self, obj, t):
        if t is not Key:
            if obj is ABSENT:
                return _ABSENT_EXT
            obj = self.default(obj) if self.default is not None else None
            if type(obj) is not Key:
                raise EncodeError("cannot send an object of type %s" % t.__name__)
        wire = _key_ext(obj)
        if self.key_cache and wire.data not in self._keys:
            try:
                self._remember_key(wire.data, obj)
            except AccessDenied:
                pass  # not a key on_key accepts: nothing to remember
        return wire

    def _convert_container(self, obj, t, state, depth):
        # Checked here too: _shared measured each shared container at one of
        # its places, and its definition goes where this walk meets it first.
        if depth >= self.max_depth:
            raise EncodeError("value nested deeper than %d levels" % self.max_depth)
        i = id(obj)
        if i in state.shared:
            number = state.numbers.get(i)
            if number is not None:
                if i in state.building:
                    raise EncodeError("cannot send a cycle through a %s" % t.__name__)
                return msgpack.ExtType(EXT_REF, _NUM.pack(number))
            number = state.numbers[i] = len(state.numbers)
            if t in (tuple, frozenset):
                state.building.add(i)
            body = self._body(obj, t, state, depth)
            state.building.discard(i)
            payload = _NUM.pack(number) + _KINDS[t] + _pack(body)
            return msgpack.ExtType(EXT_DEF, payload)
        body = self._body(obj, t, state, depth)
        if t is list:
            return body
        if t is dict:
            return body if type(body) is dict else msgpack.ExtType(EXT_DICT, _pack(body))
        code = EXT_TUPLE if t is tuple else EXT_SET if t is set else EXT_FROZENSET
        return msgpack.ExtType(code, _pack(body))

    def _body(self, obj, t, state, depth):
        depth += 1
        convert = self._convert
        if t is dict:
            if all(type(k) is str for k in obj):
                return {k: convert(v, state, depth) for k, v in obj.items()}
            flat = []
            for k, v in obj.items():
                flat.append(convert(k, state, depth))
                flat.append(convert(v, state, depth))
            return flat
        return [convert(x, state, depth) for x in obj]

    def _remember_key(self, payload, key):
        """Return on_key(key) (which may raise), remembered under the key's payload."""
        value = self.on_key(key) if self.on_key is not None else key
        if len(self._keys) >= self.key_cache:
            self._keys.clear()
        self._keys[payload] = value
        return value

    # -- decoding ---------------------------------------------------------

    def decode(self, data):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError("expected bytes, got %s" % type(data).__name__)
        if len(data) > self.max_message:
            raise DecodeError("message of %d bytes exceeds the limit of %d"
                              % (len(data), self.max_message))
        state = _DecodeState(self, len(data))
        try:
            value = state.unpack(data)
            if state.defs and type(value) in _KINDS:
                state._count(value)  # comparing it would walk every shared part
            return value
        except (DecodeError, AccessDenied):
            raise
        except (ValueError, TypeError, msgpack.UnpackException,
                RecursionError, struct.error) as e:
            raise DecodeError("malformed message: %s" % (e or type(e).__name__)) from None


class _NotSimple(Exception):
    """A container occurs twice (the message needs DEF and REF), or a dict key is not str."""


class _SimpleState:
    __slots__ = ("seen", "count")

    def __init__(self):
        self.seen = set()
        self.count = 0


class _EncodeState:
    __slots__ = ("shared", "numbers", "building")

    def __init__(self, shared):
        self.shared = shared
        self.numbers = {}
        self.building = set()


class _DecodeState:
    """Per-message decoding state: the DEF table and the ext nesting depth."""

    def __init__(self, codec, size):
        self.codec = codec
        self.defs = {}
        self.depth = 0
        self.size = codec.max_message
        self.items = codec.max_items
        # Each item takes a byte of the message at least (an empty container
        # two, counting it as its parent's member): a message of at most half
        # the limit in bytes needs no counting, which would slow it down.
        self.counted = 2 * size > self.items
        self.held = 0  # items decoded so far, when counted
        # id of each container built here -> (its items, counting a shared
        # container at every place it occurs; the container, kept so that
        # its id stays its own while decoding): see _count.
        self.sizes = {}

    def unpack(self, data):
        n = min(len(data), self.items)
        # Counted as each container is built: max_array_len and max_map_len
        # bound each alone, not the message.
        hooks = {"list_hook": self._held, "object_hook": self._held} if self.counted else {}
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=self.ext_hook,
            max_str_len=len(data), max_bin_len=len(data), max_array_len=n,
            max_map_len=n, max_ext_len=len(data), **hooks)

    def _held(self, container):
        """list_hook and object_hook: count the items of `container` (an
        array or a map just built) in the message's."""
        self.held += len(container) or 1
        if self.held > self.items:
            raise DecodeError("message holds more than %d items" % self.items)
        return container

    def ext_hook(self, code, payload):
        self.depth += 1
        try:
            if self.depth > self.codec.max_depth:
                raise DecodeError("message nested deeper than %d levels" % self.codec.max_depth)
            return self._ext(code, payload)
        finally:
            self.depth -= 1

    def _ext(self, code, payload):
        if code == EXT_KEY:
            codec = self.codec
            if codec.key_cache:
                value = codec._keys.get(payload)
                if value is None:
                    value = codec._remember_key(payload, _key_from_payload(payload))
                return value
            key = _key_from_payload(payload)
            on_key = codec.on_key
            return on_key(key) if on_key is not None else key
        if code == EXT_REF:
            if len(payload) != 4:
                raise DecodeError("malformed REF")
            number = _NUM.unpack(payload)[0]
            try:
                value = self.defs[number]
            except KeyError:
                raise DecodeError("REF to undefined container %d" % number) from None
            if value is None:
                raise DecodeError("REF to container %d before it is complete" % number)
            return value
        if code == EXT_DEF:
            return self._def(payload)
        if code == EXT_ABSENT:
            if payload:
                raise DecodeError("malformed ABSENT")
            return ABSENT
        if code in (EXT_TUPLE, EXT_SET, EXT_FROZENSET, EXT_DICT):
            items = self._items(payload)
            size = self._count(items)  # before a set or dict hashes them
            return self._keep(_build(code, items), size)
        raise DecodeError("unknown extension type %d" % code)

    def _items(self, payload):
        items = self.unpack(payload)
        if type(items) is not list:
            raise DecodeError("malformed container payload")
        return items

    def _def(self, payload):
        if len(payload) < 5:
            raise DecodeError("malformed DEF")
        number = _NUM.unpack(payload[:4])[0]
        kind = payload[4:5]
        if number in self.defs:
            raise DecodeError("container %d defined twice" % number)
        if kind in (b"l", b"D"):
            # Mutable: exists before its items, so its items may refer to it.
            container = [] if kind == b"l" else {}
            self.defs[number] = container
            items = self.unpack(payload[5:])
            size = self._count(items)  # before the dict hashes its keys
            if kind == b"l" and type(items) is list:
                container.extend(items)
            elif kind == b"D" and type(items) in (list, dict):
                _fill_dict(container, items)
            else:
                raise DecodeError("malformed DEF payload")
            return self._keep(container, size)
        code = {b"t": EXT_TUPLE, b"s": EXT_SET, b"f": EXT_FROZENSET}.get(kind)
        if code is None:
            raise DecodeError("unknown DEF kind %r" % kind)
        self.defs[number] = None
        items = self._items(payload[5:])
        size = self._count(items)
        container = self._keep(_build(code, items), size)
        self.defs[number] = container
        return container

    def _keep(self, container, size):
        """`container`, with its `size` (see _count) noted for the containers
        that will hold it."""
        self.sizes[id(container)] = (size, container)
        return container

    def _count(self, container):
        """The items in `container`, each shared part counted wherever it occurs.

        Shared parts (DEF/REF) let a small message describe a huge tree, and
        hashing a tuple or comparing two values walks that whole tree: 40
        levels of a tuple holding one tuple twice take 2**40 steps.  Counted
        before anything hashes it, such a message is refused instead.  Only
        the plain containers inside are walked: they belong to it alone, and
        the others were counted when they were built (a DEF'd list still
        being filled is empty here).
        """
        sizes = self.sizes
        total = 0
        stack = [container]
        while stack:
            value = stack.pop()
            if not value:
                total += 1  # an empty container is an item too (see the module)
            # A map's keys are str or bytes: its values are its items.
            for child in value.values() if type(value) is dict else value:
                total += 1
                if type(child) in _KINDS:
                    known = sizes.get(id(child))
                    if known is None:
                        stack.append(child)
                    else:
                        total += known[0]
            if total > self.items:
                raise DecodeError("message expands to more than %d items through its "
                                  "shared parts" % self.items)
        return total


def _build(code, items):
    if code == EXT_TUPLE:
        return tuple(items)
    if code == EXT_DICT:
        result = {}
        _fill_dict(result, items)
        return result
    try:
        return set(items) if code == EXT_SET else frozenset(items)
    except TypeError:
        raise DecodeError("unhashable set member") from None


def _fill_dict(target, flat):
    if isinstance(flat, dict):
        target.update(flat)
        return
    if len(flat) % 2:
        raise DecodeError("dict payload has an odd number of items")
    try:
        for i in range(0, len(flat), 2):
            target[flat[i]] = flat[i + 1]
    except TypeError:
        raise DecodeError("unhashable dict key") from None


_local = threading.local()


def _pack(value):
    # A Packer per thread: reusing one costs a third of msgpack.packb.  It
    # keeps the largest buffer it ever grew, so not after a large message.
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    data = packer.pack(value)
    if len(data) > _KEEP_PACKER:
        del _local.packer
    return data


def _items(container):
    """The items `container` travels as (see the module docstring); 0 if empty."""
    if type(container) is dict and not all(type(k) is str for k in container):
        return 2 * len(container)  # an array of its keys and values
    return len(container)


def _flat_map(value):
    """A copy of `value` if it is a str-keyed dict of plain values and keys, else None.

    Requests and many replies are such maps: they need no walk.
    """
    if type(value) is not dict:
        return None
    for k, v in value.items():
        t = type(v)
        if type(k) is not str or not (t in _PLAIN or t is Key
                                      or (t is int and _INT_MIN <= v <= _INT_MAX)):
            return None
    return dict(value)


def _key_ext(key):
    wire = key._wire
    if wire is None:
        ident = key.ident
        if type(ident) is tuple:
            ident = list(ident)
        wire = msgpack.ExtType(EXT_KEY, key.kind.encode() + key.mac + _pack(ident))
        object.__setattr__(key, "_wire", wire)  # keys are immutable: cache it
    return wire


def _key_from_payload(payload):
    if len(payload) < 2:
        raise DecodeError("malformed KEY")
    kind = payload[:1].decode("ascii", "replace")
    mac_len = 0 if kind == "n" else MAC_SIZE
    mac = bytes(payload[1:1 + mac_len])
    try:
        ident = msgpack.unpackb(payload[1 + mac_len:], raw=False, strict_map_key=True,
                                max_array_len=32, max_map_len=0, max_bin_len=0,
                                max_ext_len=0, max_str_len=512)
    except (ValueError, TypeError, msgpack.UnpackException):
        raise AccessDenied("malformed key") from None
    if type(ident) is list:
        ident = tuple(ident)
    return Key(kind, ident, mac)
