"""broker.codec: values round-trip, sharing and cycles survive, bad bytes are refused."""

import math
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from broker.codec import (ABSENT, EXT_DEF, EXT_DICT, EXT_KEY, EXT_REF, EXT_SET, EXT_TUPLE,
                          MAX_MESSAGE, Codec)
from broker.exc import AccessDenied, DecodeError, EncodeError
from broker.interfaces import ICodec
from broker.keys import Key, KeyRing

codec = Codec()


def roundtrip(value, c=codec):
    return c.decode(c.encode(value))


def test_implements_interface():
    assert verifyObject(ICodec, Codec())


@pytest.mark.parametrize("value", [
    None, True, False, 0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, 1.5, "", "é€", b"\x00\xff",
    [], {}, [1, [2, [3]]], {"a": {"b": None}},
])
def test_plain_values_roundtrip(value):
    result = roundtrip(value)
    assert result == value and type(result) is type(value)


def test_plain_values_are_plain_msgpack():
    value = {"op": "load", "n": [1, 2, "x"]}
    assert msgpack.unpackb(codec.encode(value), raw=False) == value


def test_nan_roundtrips():
    assert math.isnan(roundtrip(float("nan")))


def test_tuples_sets_frozensets_and_non_str_keys_keep_their_types():
    value = {"t": (1, (2, 3)), "s": {1, 2}, "f": frozenset({"x"}), "d": {(1, 2): "a", 3: "b"}}
    result = roundtrip(value)
    assert result == value
    assert type(result["t"]) is tuple and type(result["t"][1]) is tuple
    assert type(result["s"]) is set and type(result["f"]) is frozenset


def test_shared_containers_stay_shared():
    shared = [1, 2]
    tup = ("a",)
    result = roundtrip({"x": shared, "y": shared, "z": [tup, tup], "d": {"k": shared}})
    assert result["x"] is result["y"] is result["d"]["k"]
    assert result["z"][0] is result["z"][1]


def test_unshared_containers_use_no_references():
    data = codec.encode([[1], [1]])
    assert msgpack.unpackb(data, raw=False) == [[1], [1]]


def test_cycles_through_lists_and_dicts():
    a = [1]
    a.append(a)
    d = {"self": None}
    d["self"] = d
    d["list"] = a
    result = roundtrip(d)
    assert result["self"] is result
    assert result["list"][1] is result["list"]


def test_cycle_through_a_tuple_is_refused():
    inner = []
    t = (inner,)
    inner.append(t)
    with pytest.raises(EncodeError, match="cycle through a tuple"):
        codec.encode(t)


def test_keys_and_absent_roundtrip():
    ring = KeyRing(b"k" * 32)
    keys = [ring.sign("o", 7), ring.sign("s", ("root", 1)), ring.sign("f", (7, "data")),
            Key("n", 3)]
    assert roundtrip([keys, ABSENT]) == [keys, ABSENT]
    assert roundtrip(ABSENT) is ABSENT


def test_default_hook_turns_objects_into_keys():
    class Thing:
        pass

    thing = Thing()
    c = Codec(default=lambda obj: Key("n", 5) if obj is thing else None)
    assert roundtrip([thing], c) == [Key("n", 5)]


def test_on_key_replaces_keys_when_decoding():
    c = Codec(on_key=lambda key: ("resolved", key.ident))
    assert c.decode(c.encode({"k": Key("n", 9)})) == {"k": ("resolved", 9)}


@pytest.mark.parametrize("value, message", [
    (object(), "cannot send an object of type object"),
    (2 ** 64, r"an integer outside the 64-bit range \(65 bits\)"),
    (-2 ** 63 - 1, r"an integer outside the 64-bit range \(64 bits\)"),
    (1j, "complex"),
])
def test_unsupported_values_raise_encode_error(value, message):
    with pytest.raises(EncodeError, match=message):
        codec.encode({"v": value})


def test_a_value_changed_while_it_is_encoded_raises_encode_error():
    # What another thread does to a dict a client is sending, done here
    # by the hook that converts a value of an unknown type.
    message = {}
    marker = object()

    def grow(value):
        message["more"] = 1
        return Key("n", 9)

    message["first"] = marker
    message["second"] = [marker]
    with pytest.raises(EncodeError, match="changed while it was being encoded"):
        Codec(default=grow).encode({"shared": message, "again": message})


def test_depth_limit_when_encoding():
    value = []
    for _ in range(10):
        value = [value]
    with pytest.raises(EncodeError, match="deeper than 5"):
        Codec(max_depth=5).encode(value)


def nested(inner, levels):
    for _ in range(levels):
        inner = (inner,)
    return inner


def shared_part_met_deep_first():
    part, twice = nested(1, 58), []  # part: 59 levels where the depth check measures it
    return {"first": [twice, twice, nested(part, 58)], "then": part}


def chain_of_shared_parts():
    parts = [nested(1, 50)]
    for _ in range(30):
        parts.append(nested(parts[-1], 50))
    twice = []
    return [twice, twice] + parts[::-1]  # each part 51 levels deep where measured


@pytest.mark.parametrize("make", [shared_part_met_deep_first, chain_of_shared_parts])
def test_what_encodes_decodes_when_shared_parts_sit_deep(make):
    # A shared part is defined where the walk first meets it, which may be
    # deeper than where the depth check had measured it: encode() made
    # messages decode() refused, or raised RecursionError.
    value = make()
    try:
        data = codec.encode(value)
    except EncodeError as error:
        assert "deeper than 64" in str(error)
    else:
        assert codec.decode(data) == value


def test_item_limit_when_encoding():
    with pytest.raises(EncodeError, match="more than 10 items"):
        Codec(max_items=10).encode(list(range(11)))


def item_count(value):
    """The items the codec counts in `value`: the least max_items encoding it."""
    low, high = 1, 10_000
    while low < high:
        middle = (low + high) // 2
        try:
            Codec(max_items=middle).encode(value)
        except EncodeError:
            low = middle + 1
        else:
            high = middle
    return low


@pytest.mark.parametrize("value, items", [
    ([[0] * 15 for _ in range(40)], 640),                     # plain lists
    ({"a": [{"b": 1, "c": [2, 3]} for _ in range(20)]}, 101),  # maps: their entries
    ([[] for _ in range(50)] + [set() for _ in range(50)], 200),  # an empty one: one
    ({(1, 2): [3]}, 5),                                       # flat: keys and values
    ([(1, 2), {1: "x"}, {"a": set()}, [[[]]]], 13),
])
def test_the_encoder_and_the_decoder_count_items_alike(value, items):
    # Decoding counted no plain message, max_array_len bounding each array
    # alone: 16 MiB of msgpack decoded to 14 million lists (a gigabyte).
    # It refuses past the items the encoder counts, and no sooner.
    data = codec.encode(value)
    assert item_count(value) == items
    assert Codec(max_items=items).decode(data) == value
    with pytest.raises(DecodeError, match="holds more than %d items" % (items - 1)):
        Codec(max_items=items - 1).decode(data)


def test_a_plain_message_of_more_than_a_million_items_is_refused():
    within = msgpack.packb({"id": 1, "op": "ping", "x": [[0] * 9 for _ in range(99_000)]})
    assert len(codec.decode(within)["x"]) == 99_000
    data = msgpack.packb({"id": 1, "op": "ping", "x": [[0] * 9 for _ in range(100_001)]})
    assert len(data) < MAX_MESSAGE // 8
    with pytest.raises(DecodeError, match="holds more than 1000000 items"):
        codec.decode(data)


def test_empty_containers_held_by_unfinished_ones_are_counted_as_they_come():
    # Each array is counted once built, so its items only when it is: in
    # [[] x 999,999, [[] x 999,999, [...]]] the outer arrays' empty lists
    # (a byte each, 64 in memory) waited uncounted, a gigabyte in 15 MB.
    levels = b"\x90"
    for _ in range(4):
        levels = b"\xdd" + (1001).to_bytes(4, "big") + b"\x90" * 1000 + levels
    with pytest.raises(DecodeError, match="holds more than 3000 items"):
        Codec(max_items=3000).decode(levels)
    assert len(Codec(max_items=8005).decode(levels)) == 1001


def test_size_limits():
    small = Codec(max_message=100)
    with pytest.raises(EncodeError, match="exceeds the limit"):
        small.encode(b"x" * 200)
    with pytest.raises(DecodeError, match="exceeds the limit"):
        small.decode(codec.encode(b"x" * 200))


def ext(code, payload):
    return msgpack.packb(msgpack.ExtType(code, payload), use_bin_type=True)


@pytest.mark.parametrize("data, message", [
    (b"", "malformed"),
    (b"\xc1", "malformed"),                               # never-used msgpack byte
    (b"\x91", "malformed"),                               # truncated array
    (msgpack.packb(1) + b"\x00", "malformed"),              # trailing bytes
    (b"\xdd\xff\xff\xff\xff", "malformed"),                # array claiming 4G items
    (b"\xdb\xff\xff\xff\xff", "malformed"),                # str claiming 4 GB
    (msgpack.packb({1: 2}), "malformed"),                 # non-str key in a plain map
    (ext(99, b""), "unknown extension type 99"),
    (ext(EXT_REF, struct.pack(">I", 0)), "undefined container"),
    (ext(EXT_REF, b"\x00"), "malformed REF"),
    (ext(EXT_DEF, b"\x00"), "malformed DEF"),
    (ext(EXT_DEF, struct.pack(">I", 0) + b"q" + msgpack.packb([])), "unknown DEF kind"),
    (ext(EXT_DICT, msgpack.packb([1])), "odd number"),
    (ext(EXT_DICT, msgpack.packb([[1], 2])), "unhashable"),
    (ext(EXT_TUPLE, msgpack.packb(5)), "malformed container"),
])
def test_malformed_bytes_raise_decode_error(data, message):
    with pytest.raises(DecodeError, match=message):
        codec.decode(data)


def test_ref_to_an_incomplete_tuple_is_refused():
    # A tuple whose item refers to the tuple itself cannot exist.
    inner = ext(EXT_REF, struct.pack(">I", 0))
    data = ext(EXT_DEF, struct.pack(">I", 0) + b"t" + b"\x91" + inner)
    with pytest.raises(DecodeError, match="before it is complete"):
        codec.decode(data)


def shared_tree(levels, kind=b"t"):
    """DEF n [DEF n-1, REF n-1]...: a few bytes for 2**levels items."""
    node = msgpack.ExtType(EXT_DEF, struct.pack(">I", 0) + kind + msgpack.packb([]))
    for n in range(1, levels + 1):
        ref = msgpack.ExtType(EXT_REF, struct.pack(">I", n - 1))
        node = msgpack.ExtType(EXT_DEF, struct.pack(">I", n) + kind + msgpack.packb([node, ref]))
    return node


@pytest.mark.parametrize("kind", [b"t", b"l"])
def test_a_small_message_that_expands_to_a_huge_tree_is_refused(kind):
    # Hashing (in a set) or comparing 2**40 items would take for ever.
    tree = shared_tree(40, kind)
    in_a_set = msgpack.ExtType(EXT_SET, msgpack.packb([tree]))
    for value in ([tree], in_a_set) if kind == b"t" else ([tree],):
        data = msgpack.packb({"x": value})
        assert len(data) < 2000
        with pytest.raises(DecodeError, match="expands to more than"):
            codec.decode(data)


def test_many_references_to_one_big_part_are_refused_as_a_whole():
    data = msgpack.packb([shared_tree(10)]
                         + [msgpack.ExtType(EXT_REF, struct.pack(">I", 10))] * 300)
    assert len(codec.decode(data)) == 301  # 301 x 3,070 items: within a million
    with pytest.raises(DecodeError, match="expands to more than 100000 items"):
        Codec(max_items=100_000).decode(data)


def test_sharing_within_the_limit_still_decodes():
    value = roundtrip([(1, 2)] * 2 + [{"a": [3]}] * 3)
    assert value[0] is value[1] and value[2] is value[4]


def test_ext_nesting_depth_is_limited():
    payload = msgpack.packb([])
    for _ in range(10):
        payload = msgpack.packb([msgpack.ExtType(EXT_TUPLE, payload)], use_bin_type=True)
    with pytest.raises(DecodeError, match="deeper than 5"):
        Codec(max_depth=5).decode(payload)


def test_malformed_key_is_access_denied():
    with pytest.raises(AccessDenied):
        codec.decode(ext(EXT_KEY, b"o" + b"\x00" * 16 + b"\xc1"))
    with pytest.raises(AccessDenied):
        codec.decode(ext(EXT_KEY, b"z" + b"\x00" * 16 + msgpack.packb(1)))


def test_decode_rejects_non_bytes():
    with pytest.raises(DecodeError):
        codec.decode("text")


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.text(max_size=5)
    | st.binary(max_size=5) | st.floats(allow_nan=False),
    lambda children: (st.lists(children, max_size=4) | st.tuples(children, children)
                      | st.dictionaries(st.text(max_size=3), children, max_size=3)
                      | st.frozensets(st.integers(-2 ** 63, 2 ** 63), max_size=3)),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(values)
def test_any_value_roundtrips(value):
    assert roundtrip(value) == value


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_ours(data):
    try:
        codec.decode(data)
    except (DecodeError, AccessDenied):
        pass


def test_key_cache_checks_each_key_once():
    ring = KeyRing(b"k" * 32)
    checked = []

    def check(key):
        checked.append(key)
        ring.verify(key)
        return key

    c = Codec(on_key=check, key_cache=3)
    good, other = ring.sign("o", 1), ring.sign("o", 2)
    data = codec.encode({"k": good})
    assert c.decode(data) == {"k": good} and c.decode(data) == {"k": good}
    assert checked == [good]
    c.encode([other])                        # keys sent are checked and remembered too
    assert c.decode(codec.encode(other)) == other and checked == [good, other]
    forged = codec.encode(Key("o", 1, b"\x00" * 16))
    for _ in range(2):                       # a refused key is never remembered
        with pytest.raises(AccessDenied):
            c.decode(forged)
    assert len(checked) == 4
    for n in range(3, 10):                   # the cache stays within its size
        c.decode(codec.encode(ring.sign("o", n)))
        assert len(c._keys) <= 3


def test_encoding_a_key_the_checker_refuses_is_not_an_error():
    c = Codec(on_key=lambda key: KeyRing(b"k" * 32).verify(key) and key, key_cache=5)
    forged = Key("o", 1, b"\x00" * 16)
    assert codec.decode(c.encode([forged])) == [forged]
    assert c._keys == {}


def test_a_large_message_leaves_no_large_buffer_behind():
    from broker import codec as codec_module
    Codec().encode({"small": 1})
    assert hasattr(codec_module._local, "packer")  # reused: the common case
    Codec().encode({"big": bytes(4 * 1024 * 1024)})
    assert not hasattr(codec_module._local, "packer")  # dropped with its 4 MiB buffer
    assert Codec().decode(Codec().encode({"small": 1})) == {"small": 1}
