"""What dobbin.classes learns about a persistent class."""

from dobbin.classes import (MISSING, class_attribute, data_descriptor_names, dunders_of,
                            is_data_descriptor)
from dobbin.persistent import Persistent


class Base(Persistent):
    colour = "red"

    @property
    def shout(self):
        return self.name.upper()

    def greet(self):
        return "hello"


class Child(Base):
    __parent__ = None  # Zope's default: a plain value, which the state may override
    colour = "blue"

    def __len__(self):
        return 0


def test_class_attribute_follows_the_mro_and_says_missing():
    assert class_attribute(Child, "colour") == "blue"
    assert class_attribute(Child, "greet") is Base.__dict__["greet"]
    assert class_attribute(Child, "nowhere") is MISSING


def test_data_descriptors_are_properties_not_methods_or_values():
    names = data_descriptor_names(Child)
    assert "shout" in names
    assert "greet" not in names and "colour" not in names
    assert is_data_descriptor(Base.__dict__["shout"])
    assert not is_data_descriptor(Base.__dict__["greet"])


def test_dunders_are_behaviour_and_metadata_but_not_plain_defaults():
    names = dunders_of(Child)
    assert {"__len__", "__class__", "__module__", "__doc__"} <= names
    assert "__parent__" not in names


def test_answers_are_kept_per_class():
    assert data_descriptor_names(Child) is data_descriptor_names(Child)
    assert dunders_of(Child) is dunders_of(Child)
    assert dunders_of(Base) != dunders_of(Child)
