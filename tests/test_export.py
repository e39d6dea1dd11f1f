"""broker.export: what clients may read, write and call."""

import pytest
import transaction
from zope.interface.verify import verifyObject

from broker.codec import ABSENT
from broker.exc import AccessDenied, ExportError, ProtocolError
from broker.export import (ClassExport, ExportRegistry, exported, is_mapping_class,
                           visible_instances, visible_items)
from broker.interfaces import IClassExport, IExportRegistry
from broker_fixtures import Item, broker  # noqa: F401 (a fixture)
from dobbin.btree import OOBTree
from dobbin.bucket import Bucket, Length, Node
from dobbin.persistent import Persistent, PersistentDict, checkout


class Plain(Persistent):
    @exported
    def hello(self):
        return "hi"

    def private_logic(self):
        return "no"


class Child(Plain):
    pass


def test_implements_interfaces():
    registry = ExportRegistry()
    assert verifyObject(IExportRegistry, registry)
    assert verifyObject(IClassExport, registry.lookup(Plain))


def test_defaults_read_public_write_nothing_call_decorated_only():
    rules = ExportRegistry().lookup(Plain)
    assert rules.readable("name") and not rules.readable("_secret")
    assert not rules.writable("name")
    assert rules.callable("hello") and not rules.callable("private_logic")
    assert not rules.readable("hello")
    assert rules.meta()["writable"] == [] and rules.meta()["callables"] == ["hello"]


def test_explicit_export():
    registry = ExportRegistry()
    registry.export_class(Plain, fields="name size", refs=["parent"], hidden=["size"],
                          readonly=["parent"], callables=["private_logic"], creatable=True)
    rules = registry.lookup(Plain)
    assert rules.readable("name") and rules.readable("parent")
    assert not rules.readable("size") and not rules.readable("other")
    assert rules.writable("name") and not rules.writable("parent") and not rules.writable("size")
    assert rules.callable("private_logic") and rules.callable("hello")
    meta = rules.meta()
    assert meta["fields"] == ["name", "parent"] and "size" not in repr(meta)
    assert meta["creatable"] is True
    assert registry.by_name(rules.name) is rules
    assert registry.explicit_classes() == {Plain}


def test_hidden_fields_are_filtered_from_states():
    registry = ExportRegistry()
    registry.export_class(Plain, hidden=["secret"])
    state = {"name": "x", "secret": "s", "_private": 1, 3: "odd key"}
    assert registry.lookup(Plain).filter_state(state) == {"name": "x"}


def test_declared_fields_fall_back_to_class_defaults():
    class WithDefault(Persistent):
        colour = "red"
        shade = None  # a default like any other: embedded code reads None

    rules = ClassExport(WithDefault, fields=["colour", "shade", "size"])
    assert rules.filter_state({}) == {"colour": "red", "shade": None}
    assert rules.value_seen({}, "shade") is None
    assert rules.value_seen({}, "size") is ABSENT


def test_methods_and_properties_are_never_writable():
    class WithBehaviour(Persistent):
        colour = None

        def paint(self):
            self.colour = "painted"

        @property
        def shade(self):
            return "dark"

    rules = ClassExport(WithBehaviour, readonly=())
    # A value under a method's name would replace the method for server code.
    assert rules.writable("colour") and rules.writable("anything_new")
    assert not rules.writable("paint") and not rules.writable("shade")
    assert rules.meta()["writable"] is None  # every field: none declared
    # Nor can they be declared fields: a property object went into every
    # state sent, and no object of the class could be loaded.
    for name in ("paint", "shade"):
        with pytest.raises(ExportError, match="is a method or property, not a stored field"):
            ClassExport(WithBehaviour, fields=["colour", name], readonly=())
        with pytest.raises(ExportError, match=name):
            ClassExport(WithBehaviour, refs=[name])


def test_a_field_a_subclass_turns_into_a_property_is_not_inherited():
    class Named(Persistent):
        full = ""

    class Computed(Named):
        @property
        def full(self):
            return "computed"

    registry = ExportRegistry()
    registry.export_class(Named, fields="first full")
    rules = registry.lookup(Computed)
    assert rules.fields == {"first"}
    assert rules.filter_state({"first": "Ada"}) == {"first": "Ada"}
    assert registry.lookup(Named).filter_state({}) == {"full": ""}


class Tuned(Persistent):
    """A class-level setting its code reads, and fields with class defaults."""

    limit = 10
    size = 0
    label = None

    def __init__(self, label):
        self.label = label

    def grow(self):
        if self.size < self.limit:
            self.size += 1


def test_class_level_settings_are_writable_only_when_declared():
    # A client's value under `limit` would replace the setting the server's
    # code reads; `label` and `size` are fields its methods store.
    rules = ClassExport(Tuned, readonly=())
    assert not rules.writable("limit")
    assert rules.writable("label") and rules.writable("size") and rules.writable("new_field")
    assert rules.readable("limit")  # still readable, as every public name
    declared = ClassExport(Tuned, fields="limit label", readonly=())
    assert declared.writable("limit") and declared.writable("label")
    assert declared.meta()["writable"] == ["label", "limit"]
    registry = ExportRegistry()
    registry.export_class(Tuned)
    assert not registry.lookup(type("SubTuned", (Tuned,), {})).writable("limit")


@pytest.mark.parametrize("cls", [OOBTree, Bucket, Node, Length, PersistentDict])
def test_dobbins_own_classes_have_no_writable_attribute(cls):
    registry = ExportRegistry()
    registry.export_class(Persistent, readonly=())  # even exported as writable as can be
    for rules in (registry.lookup(cls), registry.export_class(cls, readonly=())):
        for name in ("max_bucket_size", "max_node_size", "keys", "values", "next", "high",
                     "unlinked", "children", "value", "anything_new"):
            assert not rules.writable(name), name
        assert rules.meta()["writable"] == []
    assert registry.lookup(cls).meta()["items_writable"] is is_mapping_class(cls)


def test_names_dobbin_defines_are_not_writable_in_subclasses_even_if_declared():
    class Catalogue(OOBTree):
        pass

    class Shelf(PersistentDict):
        label = None

    registry = ExportRegistry()
    tree = registry.export_class(Catalogue, fields="max_bucket_size label", readonly=())
    assert not tree.writable("max_bucket_size") and tree.writable("label")
    assert tree.meta()["writable"] == ["label"] and tree.meta()["items_writable"]
    registry.export_class(PersistentDict)
    shelf = registry.lookup(Shelf)
    assert shelf.writable("other") and not shelf.writable("get") and not shelf.writable("label")


def test_value_seen_is_what_filter_state_shows():
    class WithDefault(Persistent):
        colour = "red"

    declared = ClassExport(WithDefault, fields=["colour", "size"], hidden=["secret"])
    undeclared = ClassExport(WithDefault, hidden=["secret"])
    state = {"size": 3, "secret": "s"}
    for rules in (declared, undeclared):
        shown = rules.filter_state(state)
        for name in ("colour", "size", "secret", "other"):
            assert rules.value_seen(state, name) == shown.get(name, ABSENT)
    assert declared.value_seen(state, "colour") == "red"
    assert undeclared.value_seen(state, "colour") is ABSENT


class QuietItem(Item):
    """Item (exported, shout decorated) with an override of shout that is not."""

    def shout(self, suffix="!"):
        return "server-only: %s" % self.secret


class Override(Plain):
    def hello(self):  # not exported: server-side only
        return "secret"


class Reexported(Plain):
    @exported
    def hello(self):
        return "hi again"


def test_an_undecorated_override_of_an_exported_method_is_not_callable():
    registry = ExportRegistry()
    registry.export_class(Plain, readonly=())
    assert registry.lookup(Plain).callable("hello") and registry.lookup(Child).callable("hello")
    assert not registry.lookup(Override).callable("hello")
    assert registry.lookup(Override).meta()["callables"] == []
    assert registry.lookup(Reexported).callable("hello")
    # Without any export_class, as with one.
    assert not ExportRegistry().lookup(Override).callable("hello")


def test_callables_named_by_export_class_are_inherited_by_name():
    registry = ExportRegistry()
    registry.export_class(Plain, callables="private_logic")
    rules = registry.lookup(Override)
    assert rules.callable("private_logic") and not rules.callable("hello")
    assert rules.named_callables == {"private_logic"}
    registry.export_class(Override, callables="hello")  # the subclass's own export names it
    assert registry.lookup(Override).callable("hello")


def test_subclasses_inherit_rules():
    registry = ExportRegistry()
    registry.export_class(Plain, fields=["name"], readonly=())
    rules = registry.lookup(Child)
    assert rules.name.endswith("Child")
    assert rules.writable("name") and not rules.readable("other")
    assert registry.lookup(Child) is rules


@pytest.mark.parametrize("options, message", [
    ({"fields": ["_x"]}, "private name"),
    ({"fields": ["not a name"]}, "not an attribute name"),
    ({"callables": ["missing"]}, "not a method"),
    ({"fields": 5}, "fields is a space-separated str or an iterable of names, not 5"),
    ({"hidden": object()}, "hidden is a space-separated str"),
    ({"extent": "all"}, "extent is a function"),
    ({"creatable": "no"}, "creatable is True or False, not 'no'"),
    ({"creatable": 1}, "creatable is True or False"),
])
def test_bad_configuration_raises_export_error(options, message):
    with pytest.raises(ExportError, match=message):
        ExportRegistry().export_class(Plain, **options)


def test_export_class_needs_a_class():
    with pytest.raises(ExportError):
        ExportRegistry().export_class(Plain())


def test_mapping_detection():
    assert is_mapping_class(PersistentDict) and is_mapping_class(OOBTree)
    assert is_mapping_class(dict) and not is_mapping_class(Plain)
    assert ExportRegistry().lookup(OOBTree).meta()["mapping"] is True


def test_visible_items_and_instances_skip_what_clients_cannot_see():
    registry = ExportRegistry()
    registry.export_class(Item, hidden="secret")
    hidden, private, shown = Item("in a hidden field"), Item("private"), Item("shown")
    root = Item("root", secret=hidden)
    object.__setattr__(root, "__dict__", dict(root.__dict__, _admin=private, other=[shown]))
    found = list(visible_instances(root, Item, registry, 10))
    assert found == [root, shown]
    with pytest.raises(ProtocolError, match="more than 1 objects"):
        list(visible_instances(root, Item, registry, 1))
    rules = registry.lookup(Item)
    assert visible_items(rules, {"secret": 1, "name": 2, 3: 4}) == {"name": 2, 3: 4}


def test_a_class_search_walks_values_that_hold_themselves_once(open_db):
    # A client may store a list in itself: the walk went round it for ever,
    # holding a worker each time; a shared value was walked per occurrence.
    db = open_db(durability="none")
    registry = ExportRegistry()
    registry.export_class(Item)
    loop = []
    loop.append(loop)
    shared = [Item("in a shared list")]
    for _ in range(40):
        shared = [shared, shared]  # 2**40 paths, 41 lists
    root = Item("root")
    checkout(root)
    root.tags, root.shared, root.again = loop, shared, {"loop": loop}
    db.elect(root)
    transaction.commit()
    found = list(visible_instances(root, Item, registry, 10))
    assert sorted(item.name for item in found) == ["in a shared list", "root"]


def test_a_client_cannot_call_an_undecorated_override(broker):
    db, _server, connect = broker
    checkout(db.root.things)
    db.root.things["quiet"] = QuietItem("quiet", secret="top secret")
    transaction.commit()
    client = connect()
    quiet = client.root.things["quiet"]
    assert quiet.rename("still exported") == "still exported"
    with pytest.raises(AttributeError):
        quiet.shout()
    # Asked directly, the server refuses too.
    with pytest.raises(AccessDenied, match="not exported"):
        client._invoke(quiet, "shout", (), {})
    assert client.root.item.shout() == "FIRST!"


def test_a_client_cannot_change_a_b_tree_setting(broker):
    db, _server, connect = broker
    client = connect()
    tree = client.root.tree
    with pytest.raises(AttributeError, match="not writable"):
        tree.max_bucket_size = "x"
    # Past the client's own check, the server refuses the commit.
    client._changes.set_attr(tree, "max_bucket_size", "x", ABSENT)
    with pytest.raises(AccessDenied, match="max_bucket_size"):
        client.commit()
    tree["k"] = 1  # items stay writable
    client.root.item.name = "fields with class defaults too"
    client.commit()
    transaction.begin()
    assert db.root.tree.max_bucket_size == 64
    db.root.tree["server"] = 2  # the server's own inserts still work
    transaction.commit()
    assert dict(db.root.tree.items()) == {"k": 1, "server": 2}
    assert db.root.item.name == "fields with class defaults too"


def test_exporting_a_class_again_changes_what_its_subclasses_inherit():
    # The rules a subclass derived stayed known by name: clients could still
    # create it with the hidden field set.
    registry = ExportRegistry()
    registry.export_class(Plain, creatable=True)
    assert registry.lookup(Child).creatable
    name = registry.lookup(Child).name
    assert registry.by_name(name).creatable
    registry.export_class(Plain, hidden="secret", creatable=False)
    assert registry.by_name(name) in (None, registry.lookup(Child))
    derived = registry.lookup(Child)
    assert not derived.creatable and "secret" in derived.hidden
    assert registry.by_name(name) is derived
    assert registry.by_name(registry.lookup(Plain).name) is registry.lookup(Plain)


class WithPassword(Persistent):
    pass


class Named(Persistent):
    pass


class User(Named, WithPassword):
    pass


class Admin(WithPassword):
    pass


def test_a_field_any_exported_base_hides_stays_hidden():
    # Only the first exported class of the MRO counted: a User(Named,
    # WithPassword) sent its password, and so did a subclass exported on
    # its own.
    registry = ExportRegistry()
    registry.export_class(WithPassword, hidden="password")
    registry.export_class(Named, fields=("name", "password"))
    for cls in (User, Admin, WithPassword):
        rules = registry.lookup(cls)
        assert "password" in rules.hidden and not rules.readable("password"), cls
    assert registry.lookup(User).readable("name") and not registry.lookup(User).readable("age")
    explicit = registry.export_class(Admin, creatable=True)
    assert explicit is registry.lookup(Admin) and "password" in explicit.hidden
    assert explicit.creatable and not explicit.readable("password")
    assert registry.by_name(explicit.name) is explicit
