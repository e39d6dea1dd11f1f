"""broker.values: request values resolved, and refused when they could not be sent back."""

import io

import msgpack
import pytest

from broker.codec import ABSENT, MAX_DEPTH, Codec
from broker.exc import ProtocolError
from broker.keys import Key
from broker.export import ExportRegistry
from broker.values import (MAX_VALUE_DEPTH, Touched, as_sent, check_sendable, not_a_key,
                           placeholder_key, resolve_values, same_value)
from broker_fixtures import Item
from dobbin.persistent import PersistentDict, PersistentFile, _set_oid


class Static:
    """A static object: served, but not in the database."""


OBJECTS = {Key("n", 1): Item("new"), Key("s", ("status",)): Static(),
           Key("s", ("item",)): Item("static but persistent"), Key("n", 2): PersistentDict()}


def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


def test_keys_are_replaced_and_shared_parts_stay_shared():
    shared = [Key("n", 1)]
    value = {"a": shared, "b": (shared, frozenset({2})), "c": {3}}
    value["self"] = value
    resolved = resolve_values(value, OBJECTS.__getitem__)
    new = OBJECTS[Key("n", 1)]
    assert resolved["a"] == [new] and resolved["b"][0] is resolved["a"]
    assert resolved["b"][1] == frozenset({2}) and resolved["c"] == {3}
    assert resolved["self"] is resolved
    assert value["a"] == [Key("n", 1)]  # the request is left as it came


@pytest.mark.parametrize("value", [ABSENT, [1, ABSENT], {"k": ABSENT}, (ABSENT,)])
def test_absent_is_refused_anywhere(value):
    with pytest.raises(ProtocolError, match="cannot be ABSENT"):
        resolve_values(value, OBJECTS.__getitem__)


def test_a_type_the_codec_does_not_send_is_refused():
    timestamp = Codec().decode(msgpack.packb({"t": msgpack.Timestamp(5)}))["t"]
    with pytest.raises(ProtocolError, match="cannot be a Timestamp"):
        resolve_values([timestamp], OBJECTS.__getitem__)


def test_nesting_is_bounded_below_what_the_codec_sends():
    assert MAX_VALUE_DEPTH < MAX_DEPTH
    assert resolve_values(nested(MAX_VALUE_DEPTH), OBJECTS.__getitem__) == nested(
        MAX_VALUE_DEPTH)
    Codec().encode({"ok": {"items": [[1, nested(MAX_VALUE_DEPTH)]]}})  # and can be sent
    for depth in (MAX_VALUE_DEPTH + 1, 900, 5000):  # past Python's recursion limit too
        with pytest.raises(ProtocolError, match="nested deeper than %d" % MAX_VALUE_DEPTH):
            resolve_values(nested(depth), OBJECTS.__getitem__)


@pytest.mark.parametrize("value, place", [
    (frozenset([Key("n", 2)]), "in a frozenset"), ({Key("n", 2)}, "in a set"),
    ({Key("n", 2): 1}, "as a dict key"), ([{"x": frozenset([1, Key("n", 2)])}], "in a frozenset"),
])
def test_a_mapping_in_a_set_or_as_a_dict_key_is_refused(value, place):
    # Unhashable on the server: it once answered an untyped TypeError.
    with pytest.raises(ProtocolError, match="type PersistentDict %s: it is unhashable" % place):
        resolve_values(value, OBJECTS.__getitem__)
    assert resolve_values((Key("n", 2),), OBJECTS.__getitem__) == (OBJECTS[Key("n", 2)],)


class Secretive:
    def __repr__(self):
        return "Secretive(password='s3cr3t')"


def test_not_a_key_shows_plain_data_but_never_an_objects_repr():
    error = TypeError("OOBTree keys must be totally ordered; Secretive(password='s3cr3t') "
                      "(Secretive) has no ordering")
    refusal = not_a_key("oid 3", Secretive(), error)
    assert "s3cr3t" not in str(refusal) and "type Secretive" in str(refusal)
    nan = TypeError("OOBTree keys must be totally ordered; nan in key (1, nan) is not")
    assert str(nan) in str(not_a_key("oid 3", (1, float("nan")), nan))


def test_a_static_object_is_refused_only_where_it_would_be_stored():
    key = Key("s", ("status",))
    assert resolve_values([key], OBJECTS.__getitem__) == [OBJECTS[key]]
    with pytest.raises(ProtocolError, match="not in the database"):
        resolve_values({"x": [key]}, OBJECTS.__getitem__, storing=True)
    persistent = Key("s", ("item",))
    assert resolve_values(persistent, OBJECTS.__getitem__, storing=True) is OBJECTS[persistent]


NAN = float("nan")


class Exotic:
    def __eq__(self, other):
        raise RuntimeError("cannot compare")


@pytest.mark.parametrize("current, read, same", [
    (1, 1, True), (1, True, False), (1, 1.0, False), ("a", "a", True),
    (ABSENT, ABSENT, True), (ABSENT, None, False), (None, ABSENT, False),
    ([1, 2], [1, 2], True), ((1,), [1], False), (Exotic(), Exotic(), False),
    (NAN, float("nan"), True), (NAN, 1.0, False), (1.0, NAN, False),
    ([1, NAN], [1, float("nan")], True), ({"k": (NAN,)}, {"k": (float("nan"),)}, True),
    ([NAN], [NAN, NAN], False), ({"k": NAN}, {"j": NAN}, False), ([NAN], [2.0], False),
])
def test_same_value(current, read, same):
    assert same_value(current, read) is same


def test_persistent_objects_are_the_same_when_their_oids_are():
    one, other, new = Item("a"), Item("a"), Item("a")
    _set_oid(one, 7)
    _set_oid(other, 7)
    assert same_value(one, other)
    assert not same_value(new, Item("a"))  # unstored: no oid to compare


def nan():
    """A NaN of its own: NaN is not equal to itself, and sets and dicts find
    the very same object by identity, which would hide what is tested."""
    return float("nan")


@pytest.mark.parametrize("current, read", [
    ([1], [1.0]), ({"a": 1}, {"a": True}), ((1, 2), (True, 2.0)), ([[1]], [[True]]),
    (0.0, -0.0), ([0.0], [-0.0]), ({"k": (-0.0,)}, {"k": (0.0,)}),
    ({1}, {1.0}), (frozenset({1}), frozenset({True})), ({0.0}, {-0.0}), ({(1,)}, {(1.0,)}),
    ({1: "x"}, {1.0: "x"}), ({(0.0,): 1}, {(-0.0,): 1}),
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}), ([{"a": 1, "b": 2}], [{"b": 2, "a": 1}]),
])
def test_values_equal_by_python_but_not_as_clients_see_them_differ(current, read):
    assert same_value(current, read) is False
    assert same_value(read, current) is False


@pytest.mark.parametrize("current, read", [
    ({NAN}, {nan()}), (frozenset({NAN}), frozenset({nan()})), ({NAN: 1}, {nan(): 1}),
    ({(NAN,)}, {(nan(),)}), ([{frozenset({NAN})}], [{frozenset({nan()})}]),
    ({(1, NAN): {NAN}}, {(1, nan()): {nan()}}), ({NAN, nan()}, {nan(), nan()}),
    ({1, "a", (2, NAN)}, {(2, nan()), "a", 1}),
])
def test_nans_in_sets_and_dict_keys_match_nans_in_the_same_places(current, read):
    assert same_value(current, read) is True


@pytest.mark.parametrize("current, read", [
    ({NAN}, {1.0}), ({NAN, nan()}, {nan()}), ({NAN: 1}, {nan(): 2}), ({(NAN,)}, {(NAN, 1)}),
    ({NAN}, {-NAN}),
])
def test_nans_in_sets_and_dict_keys_still_tell_changes(current, read):
    assert same_value(current, read) is False


def test_persistent_objects_in_sets_and_keys_are_the_same_when_their_oids_are():
    one, other = Item("a"), Item("a")
    _set_oid(one, 7)
    _set_oid(other, 7)
    assert same_value({(one, 1)}, {(other, 1)})
    assert same_value({one: [one]}, {other: [other]})
    assert not same_value({Item("a")}, {Item("a")})  # unstored: no oid to compare


def nested_frozensets(depth):
    """`depth` frozensets, each holding the next, the last holding 1."""
    value = frozenset({1})
    for _ in range(depth - 1):
        value = frozenset({value})
    return value


def test_values_nested_past_what_a_client_sends_are_not_the_same():
    assert same_value(nested(MAX_VALUE_DEPTH), nested(MAX_VALUE_DEPTH))
    assert same_value(nested_frozensets(MAX_VALUE_DEPTH), nested_frozensets(MAX_VALUE_DEPTH))
    for depth in (MAX_VALUE_DEPTH + 1, 5000):  # past Python's recursion limit too
        assert same_value(nested(depth), nested(depth)) is False
        assert same_value({nested_frozensets(depth)}, {nested_frozensets(depth)}) is False


def cycle(*items):
    """A list of `items`, each None standing for the list itself."""
    value = []
    value.extend(value if x is None else x for x in items)
    return value


def test_cyclic_values_are_the_same_when_they_unfold_alike():
    assert same_value(cycle(None), cycle(None))
    assert same_value(cycle(None, None, 1), cycle(None, None, 1))  # each part once, not 2**n
    assert not same_value(cycle(None, 1), cycle(None, 1.0))
    assert not same_value(cycle(None), [[[[1]]]])
    loop, other = {}, {}
    loop["self"], other["self"] = loop, other
    assert same_value(loop, other)


def test_check_sendable_refuses_a_record_the_codec_could_not_send():
    codec = Codec(default=placeholder_key, max_items=10)
    exports = ExportRegistry()
    small, big = Item("small"), Item(list(range(20)))
    holder = Item([small, big])  # objects count as keys, whatever their own size
    check_sendable(Touched([small, holder]), exports, codec)
    with pytest.raises(ProtocolError, match="would leave broker_fixtures.Item unsendable"):
        check_sendable(Touched([small, big]), exports, codec)
    assert placeholder_key("text") is None


def test_check_sendable_counts_shared_parts_wherever_they_occur_as_clients_do():
    codec = Codec(default=placeholder_key, max_items=1000)
    exports = ExportRegistry()
    row = list(range(100))
    check_sendable(Touched([Item([row] * 8)]), exports, codec)  # 808 items as decoded
    # Encoded, the row counts once (110 items); a client would decode 1,110.
    with pytest.raises(ProtocolError, match="more than 1000 items through its shared parts"):
        check_sendable(Touched([Item([row] * 10)]), exports, codec)
    # And the reply around a record counts too: its id, server and result.
    state = ExportRegistry().lookup(Item).filter_state(Item(None).__dict__)
    size = 1000 - 3 - len(state)  # the record's 3 entries, its state's, the list's items
    state["name"] = list(range(size))
    codec.encode({"class": "broker_fixtures.Item", "serial": 0, "state": state})  # alone, fits
    item = Item(list(range(size)))
    with pytest.raises(ProtocolError, match="more than 1000 items"):
        check_sendable(Touched([item]), exports, codec)


def test_check_sendable_takes_a_stream_only_as_an_attribute_of_its_own():
    codec = Codec(default=placeholder_key)
    exports = ExportRegistry()
    stored_file = PersistentFile(io.BytesIO(b"bytes"))
    check_sendable(Touched([Item(stored_file)]), exports, codec)  # sent as a stream key
    for value in ([stored_file], {"cover": stored_file}, (1, stored_file)):
        with pytest.raises(ProtocolError, match="a stream can be sent only as an attribute "
                                                "of its own"):
            check_sendable(Touched([Item(value)]), exports, codec)
    named = Item("x")
    named.__dict__["s" * 257] = stored_file  # a stream key holds its name: 256 at most
    with pytest.raises(ProtocolError, match="may have at most 256 characters, not 257"):
        check_sendable(Touched([named]), exports, codec)


def test_check_sendable_refuses_an_item_the_codec_could_not_send_alone():
    codec = Codec(default=placeholder_key, max_items=30)
    exports = ExportRegistry()
    loop = []
    pair = (loop,)
    loop.append(pair)
    check_sendable(Touched(items=[("oid 3", "a", loop), ("oid 3", (Item("x"), 1), [1, 2])]),
                   exports, codec)
    Codec().encode([loop, pair])  # the list first, together they encode...
    with pytest.raises(ProtocolError, match="an item of oid 3 that cannot be sent: cannot "
                                            "send a cycle through a tuple"):
        check_sendable(Touched(items=[("oid 3", "a", loop), ("oid 3", "b", pair)]),
                       exports, codec)  # ...but not "b" alone
    for item, value in [("k", list(range(40))), (tuple(range(40)), 1)]:
        with pytest.raises(ProtocolError, match="cannot be sent: value has more than 30 items"):
            check_sendable(Touched(items=[("oid 3", item, value)]), exports, codec)


def test_as_sent_names_every_object_by_key_of():
    new, stored = Item("new"), Item("stored")
    names = {id(new): "new #1", id(stored): "oid 5"}.__getitem__
    item = (new, frozenset({stored}), "text", 1.5, None)
    assert as_sent(item, lambda obj: names(id(obj))) == (
        "new #1", frozenset({"oid 5"}), "text", 1.5, None)


def test_changed_in_transaction_lists_changes_and_the_new_objects_they_reach(open_db):
    import transaction
    from dobbin.btree import OOBTree
    from dobbin.persistent import PersistentDict, checkout
    from broker.values import changed_in_transaction
    db = open_db(durability="none")
    root = PersistentDict(kept="same", changed=1)
    checkout(root)
    root.tree = OOBTree({"kept": "same", "changed": 1})
    db.elect(root)
    transaction.commit()
    unchanged = changed_in_transaction(db, ExportRegistry())
    assert list(unchanged) == [] and unchanged.items == []

    checkout(root)
    root["changed"] = 2.0  # 1 and 1.0 differ for clients
    new = Item("new")
    root["added"] = [new]  # reached only through the item
    root.tree["changed"] = 2
    root.tree.update(("k%03d" % n, n) for n in range(100))  # splits: new buckets, nodes
    touched = changed_in_transaction(db, ExportRegistry())
    # The tree for its attributes (a root split changed it); no pieces.
    assert set(map(type, touched)) == {PersistentDict, Item, OOBTree}
    assert new in touched and root in touched
    items = {(where, item) for where, item, _value in touched.items}
    assert ("a PersistentDict", "changed") in items and ("a PersistentDict", "added") in items
    assert ("a Bucket", "changed") in items and ("a Bucket", "k099") in items
    assert ("a PersistentDict", "kept") not in items  # (a split moved the tree's "kept")
    transaction.abort()


def test_changed_in_transaction_leaves_out_what_clients_never_see(open_db):
    # A hidden item, and a new object reached only through a hidden field,
    # were checked as if sent: an exported method storing one that the
    # codec refuses was refused, and the message showed the hidden value.
    import transaction
    from dobbin.persistent import checkout
    from broker.values import changed_in_transaction
    db = open_db(durability="none")
    exports = ExportRegistry()
    exports.export_class(PersistentDict, hidden="password")
    exports.export_class(Item, hidden="vault")
    root = PersistentDict()
    checkout(root)
    root.holder = Item("holder")
    db.elect(root)
    transaction.commit()
    checkout(root)
    root["password"], root["owner"] = 2 ** 70, "me"
    checkout(root.holder)
    secret, seen = Item(2 ** 70), Item("seen")
    root.holder.vault, root.holder.friend = secret, seen
    touched = changed_in_transaction(db, exports)
    assert [item for _, item, _ in touched.items] == ["owner"]
    assert seen in touched and secret not in touched
    check_sendable(touched, exports, Codec(default=placeholder_key))
    transaction.abort()


def test_an_integer_too_big_to_send_is_not_quoted():
    with pytest.raises(ProtocolError) as refused:
        check_sendable(Touched(items=[("a Vault", "pin", 12345 ** 9)]), ExportRegistry(), Codec())
    assert "an integer outside the 64-bit range (123 bits)" in str(refused.value)
    assert str(12345 ** 9) not in str(refused.value)


def test_changed_in_transaction_takes_a_mapping_made_without_its_init(open_db):
    # As server.obj_new makes them: cls.__new__, then fields.
    import transaction
    from dobbin.persistent import PersistentDict, checkout
    from broker.values import changed_in_transaction
    db = open_db(durability="none")
    root = PersistentDict()
    checkout(root)
    db.elect(root)
    transaction.commit()
    made = PersistentDict.__new__(PersistentDict)
    checkout(made)
    made.title = "no items"
    checkout(root)
    root["made"] = made
    touched = changed_in_transaction(db, ExportRegistry())
    assert any(obj is made for obj in touched)
    assert [item for _, item, _ in touched.items] == ["made"]
    transaction.abort()
