"""broker.export: what clients may read, write and call."""

import pytest
from zope.interface.verify import verifyObject

from broker.codec import ABSENT
from broker.exc import ExportError, ProtocolError
from broker.export import (ClassExport, ExportRegistry, exported, is_mapping_class,
                           visible_instances, visible_items)
from broker.interfaces import IClassExport, IExportRegistry
from broker_fixtures import Item
from dobbin.btree import OOBTree
from dobbin.persistent import Persistent, PersistentDict


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

    rules = ClassExport(WithDefault, fields=["colour"])
    assert rules.filter_state({}) == {"colour": "red"}


def test_methods_and_properties_are_never_writable():
    class WithBehaviour(Persistent):
        colour = None

        def paint(self):
            return "painted"

        @property
        def shade(self):
            return "dark"

    rules = ClassExport(WithBehaviour, readonly=())
    # A value under a method's name would replace the method for server code.
    assert rules.writable("colour") and rules.writable("anything_new")
    assert not rules.writable("paint") and not rules.writable("shade")
    assert rules.meta()["writable"] is None  # every field: none declared


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
