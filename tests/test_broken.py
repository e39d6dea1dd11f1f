"""dobbin.broken: objects whose class can no longer be imported load as
stand-ins, and are written back unchanged until the class returns."""

import importlib
import logging
import sys
import textwrap
import uuid

import pytest
import transaction
from zope.interface.verify import verifyClass, verifyObject

from dobbin.broken import Broken, BrokenPersistent, find_global
from dobbin.database import Database
from dobbin.exc import BrokenObjectError, LoadError
from dobbin.interfaces import IBroken
from dobbin.persistent import PersistentDict, checkout

MODULE_SOURCE = textwrap.dedent("""
    from dobbin.persistent import Persistent

    class Thing(Persistent):
        def __init__(self, n):
            self.n = n

    class Value:
        def __init__(self, n):
            self.n = n

        def __eq__(self, other):
            return type(other) is Value and other.__dict__ == self.__dict__

    class Tags(list):
        pass

    class Settings(dict):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.source = "file"

    class Outer:
        class Inner:
            def __init__(self, n):
                self.n = n

    class Point:
        __slots__ = ("x", "y")

        def __init__(self, x, y):
            self.x, self.y = x, y

        def __getstate__(self):
            return None, {"x": self.x, "y": self.y}

    class Keyed:
        def __new__(cls, *, key):
            self = object.__new__(cls)
            self.key = key
            return self

        def __getnewargs_ex__(self):
            return (), {"key": self.key}

    class Called:
        def __init__(self, a, b):
            self.total = a + b
            self.args = (a, b)

        def __reduce__(self):
            return Called, self.args
""")


@pytest.fixture
def vanishing(tmp_path, monkeypatch):
    """A module of classes (a new name per test: stand-ins are per name)
    that can be removed from, and put back into, the code."""
    name = "vanishing_%s" % uuid.uuid4().hex
    source = tmp_path / ("%s.py" % name)
    source.write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))

    class Module:
        def load(self):
            importlib.invalidate_caches()
            return importlib.import_module(name)

        def remove(self):
            source.rename(tmp_path / "removed.txt")
            sys.modules.pop(name, None)
            importlib.invalidate_caches()

        def restore(self):
            (tmp_path / "removed.txt").rename(source)
            return self.load()

    yield Module()
    sys.modules.pop(name, None)


def stored_without_its_classes(tmp_path, vanishing):
    """The path of a database stored with the module's classes, now gone."""
    path = str(tmp_path / "db.dobbin")
    store(path, vanishing.load())
    vanishing.remove()
    return path


def store(path, module):
    db = Database(path)
    db.elect(PersistentDict(
        thing=module.Thing(7), other=PersistentDict(a=1), value=module.Value(2),
        tags=module.Tags(["x", "y"]), settings=module.Settings(mode="fast"),
        inner=module.Outer.Inner(3), point=module.Point(1, 2), keyed=module.Keyed(key="k"),
        called=module.Called(4, 5)))
    transaction.commit()
    db.close()


def test_the_root_loads_when_the_classes_it_refers_to_are_gone(tmp_path, vanishing, caplog):
    path = stored_without_its_classes(tmp_path, vanishing)
    with caplog.at_level(logging.WARNING, logger="dobbin"):
        db = Database(path)
        root = db.root
        assert root["other"]["a"] == 1
        thing = root["thing"]
        assert isinstance(thing, BrokenPersistent)
        assert type(thing).__qualname__ == "Thing" and thing.n == 7
        assert "No module named" in type(thing)._p_broken
        verifyObject(IBroken, thing)
        value = root["value"]
        assert isinstance(value, Broken) and value.n == 2
        assert repr(value) == "<broken %s.Value instance>" % type(value).__module__
        verifyObject(IBroken, value)
        assert root["inner"].n == 3
        assert root["point"].x == 1
        assert root["keyed"].key == "k"
        assert isinstance(root["called"], Broken)  # made by a call: it has no state
    # One warning per missing class, naming it.
    warnings = [record.getMessage() for record in caplog.records
                if "could not be imported" in record.getMessage()]
    assert len(warnings) == len({w.split(" could")[0] for w in warnings}) == 8
    db.close()


def test_stand_ins_cannot_be_changed_or_made(tmp_path, vanishing):
    path = stored_without_its_classes(tmp_path, vanishing)
    db = Database(path)
    thing, value = db.root["thing"], db.root["value"]
    with pytest.raises(BrokenObjectError, match=r"Thing oid \d+ can't be checked out"):
        checkout(thing)
    with pytest.raises(BrokenObjectError, match="can't be changed"):
        value.n = 3
    with pytest.raises(BrokenObjectError, match="can't be changed"):
        del value.n
    with pytest.raises(AttributeError, match="no attribute 'missing'.*could not be imported"):
        value.missing
    with pytest.raises(TypeError, match="makes no new objects"):
        type(thing)()
    transaction.abort()
    db.close()


def test_stand_ins_are_written_back_unchanged_until_the_class_returns(tmp_path, vanishing):
    path = stored_without_its_classes(tmp_path, vanishing)
    db = Database(path)
    root = db.root
    checkout(root)  # the stand-in values are copied into the working copy
    root["other"] = "changed"
    transaction.commit()
    assert isinstance(root["value"], Broken) and root["other"] == "changed"
    db.close()
    # Written again while the class is gone, then reopened with it back.
    module = vanishing.restore()
    db = Database(path)
    root = db.root
    assert type(root["thing"]) is module.Thing and root["thing"].n == 7
    assert root["value"] == module.Value(2)
    assert type(root["tags"]) is module.Tags and root["tags"] == ["x", "y"]
    settings = root["settings"]
    assert type(settings) is module.Settings and settings == {"mode": "fast"}
    assert settings.source == "file"
    assert type(root["inner"]) is module.Outer.Inner and root["inner"].n == 3
    assert (root["point"].x, root["point"].y) == (1, 2)
    assert root["keyed"].key == "k"
    assert type(root["called"]) is module.Called and root["called"].total == 9
    checkout(root["thing"])  # a real class again: changeable
    root["thing"].n = 8
    transaction.commit()
    db.close()


def test_a_snapshot_keeps_stand_ins_as_they_were(tmp_path, vanishing):
    path, copy = str(tmp_path / "db.dobbin"), str(tmp_path / "copy.dobbin")
    store(path, vanishing.load())
    vanishing.remove()
    with Database(path) as db, Database(copy) as target:
        db.snapshot(target)
    module = vanishing.restore()
    with Database(copy) as db:
        assert type(db.root["thing"]) is module.Thing and db.root["thing"].n == 7
        assert db.root["value"] == module.Value(2)


def test_a_class_gone_from_a_module_that_remains(tmp_path, vanishing):
    path = str(tmp_path / "db.dobbin")
    module = vanishing.load()
    store(path, module)
    del module.Value
    db = Database(path)
    assert "Can't get attribute 'Value'" in type(db.root["value"])._p_broken
    assert db.root["value"].n == 2
    db.close()


def test_a_module_that_fails_to_import_otherwise_is_a_load_error(tmp_path, vanishing):
    path = str(tmp_path / "db.dobbin")
    module = vanishing.load()
    store(path, module)
    vanishing.remove()
    # A bug in the code is not a missing class: it is reported, not hidden.
    (tmp_path / ("%s.py" % module.__name__)).write_text("raise RuntimeError('bug')\n")
    importlib.invalidate_caches()
    db = Database(path)
    with pytest.raises(LoadError, match="RuntimeError: bug"):
        db.root
    db.close()


def test_find_global_finds_the_class_or_its_stand_in():
    assert find_global("dobbin.persistent", "PersistentDict") is PersistentDict
    assert find_global("collections", "OrderedDict.fromkeys") is not None
    missing = find_global("no_such_module_here", "Thing")
    assert issubclass(missing, Broken) and missing is find_global("no_such_module_here", "Thing")


@pytest.mark.parametrize("cls", [Broken, BrokenPersistent])
def test_stand_in_bases_implement_their_interface(cls):
    assert verifyClass(IBroken, cls)
