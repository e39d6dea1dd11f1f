"""Tests of dobbin.persistent: read-only shared state, per-thread
checkouts, __init__ that runs once, deletions that persist, and the full
dict API of PersistentDict."""

import copy
import dataclasses
import threading

import pytest
import transaction

from dobbin.database import Database
from dobbin.exc import DobbinError, ReadOnlyError
from dobbin.persistent import Persistent, PersistentDict, checked_out, checkout, state_of

READ_ONLY = "Can't set attribute in read-only mode."


class Counted(Persistent):
    """Counts its __init__ calls, to prove they happen once per object."""

    inits = 0

    def __init__(self, value):
        type(self).inits += 1
        self.value = value


class CountedChild(Counted):
    def __init__(self, value, extra):
        super().__init__(value)
        self.extra = extra


def stored_root(open_db, root=None):
    """Elect `root` (a new Persistent by default) in a fresh db and commit."""
    db = open_db()
    root = Persistent() if root is None else root
    db.elect(root)
    transaction.commit()
    return db, root


# -- read-only unless checked out --------------------------------------------

def test_new_object_outside_init_is_read_only():
    obj = Persistent()
    with pytest.raises(RuntimeError, match="^Can't set attribute in read-only mode.$"):
        obj.name = "John"
    with pytest.raises(RuntimeError, match=READ_ONLY):
        del obj.name
    assert not hasattr(obj, "name")


def test_checkout_makes_object_writable_and_returns_none():
    obj = Persistent()
    assert checkout(obj) is None
    assert checked_out(obj)
    obj.name = "John"
    assert obj.name == "John"
    checkout(obj)  # a second checkout in one transaction keeps the working copy
    assert obj.name == "John"
    transaction.abort()
    assert not checked_out(obj)
    assert not hasattr(obj, "name")


def test_checkout_of_non_persistent_object_raises_type_error():
    class Plain:
        pass

    for value in (Plain(), {}, [], 42):
        with pytest.raises(TypeError, match="only persistent objects can be checked out"):
            checkout(value)


def test_checkout_of_an_object_of_a_closed_database_raises_at_once(db_path):
    # It used to succeed, and the commit failed later, far from the cause.
    db = Database(db_path, durability="none")
    db.elect(PersistentDict(name="root"))
    transaction.commit()
    root = db.root
    root["name"]  # loaded
    db.close()
    with pytest.raises(ReadOnlyError, match="is closed"):
        checkout(root)
    assert not checked_out(root)
    transaction.abort()


# -- __init__ runs once ----------------------------------------------------------

def test_the_oid_is_the_databases_to_set(open_db):
    # A stored object given another oid was written under it: the next open
    # of the file called the record corrupt (an oid above its oid high).
    db = open_db()
    root = PersistentDict()
    db.elect(root)
    transaction.commit()
    for obj in (root, Persistent()):
        with pytest.raises(AttributeError, match="_p_oid is set by the database only"):
            obj._p_oid = 999
    assert root._p_oid == 1


@pytest.mark.parametrize("name", ["_p_jar", "_p_serial", "_p_ghost", "_p_local", "_p_init",
                                  "_p_size"])
def test_the_other_p_slots_are_the_databases_to_set_too(open_db, tmp_path, name):
    # `item._p_jar = other_db` was taken: storing the item there then wrote
    # a reference to whatever object of the other database had its oid.
    db = open_db()
    db.elect(PersistentDict(item=PersistentDict(name="item")))
    transaction.commit()
    item = db.root["item"]
    other = open_db(str(tmp_path / "other.dobbin"))
    value = other if name == "_p_jar" else getattr(item, name)
    with pytest.raises(AttributeError, match="%s is set by the database only" % name):
        setattr(item, name, value)
    assert item._p_jar is db
    other.elect(PersistentDict(moved=item))
    with pytest.raises(DobbinError, match="another database"):
        transaction.commit()
    transaction.abort()


def test_p_changed_asks_for_a_checkout_and_other_p_names_are_refused(open_db):
    # ZODB's `obj._p_changed = True` went into the state every thread
    # shares, with no checkout, and the next commit stored it as data.
    db = open_db()
    root = PersistentDict(items=[])
    db.elect(root)
    transaction.commit()
    root["items"].append("in place")  # what a ZODB program does first
    with pytest.raises(RuntimeError, match="check the object out"):
        root._p_changed = True
    with pytest.raises(AttributeError, match="_p_volatile is not an attribute"):
        root._p_volatile = 1
    checkout(root)
    root["items"] = ["checked out"]
    root._p_changed = True  # harmless: a checked-out object is stored whole
    transaction.commit()
    assert db.load_state(root._p_oid)[1] == {"_data": {"items": ["checked out"]}}


def test_copying_a_persistent_object_is_refused_not_aliased(open_db):
    # copy.deepcopy returned the object itself: "clone a template and
    # change the clone" changed the template.  copy.copy blamed pickling.
    db = open_db()
    template = PersistentDict(lines=["a"])
    db.elect(template)
    transaction.commit()
    for copier in (copy.deepcopy, copy.copy):
        with pytest.raises(TypeError, match="make a new PersistentDict"):
            copier(template)
    # A checkout still copies states deeply, keeping references.
    holder = PersistentDict(template=template, lines=[template, ["b"]])
    checkout(template)
    template["holder"] = holder
    transaction.commit()
    checkout(holder)
    assert holder["lines"][0] is template and holder["template"] is template
    transaction.abort()


class Located(Persistent):
    """Zope's location pattern: dunder names kept in the state."""

    def __init__(self, name, parent):
        self.__name__ = name
        self.__parent__ = parent


def test_dunder_attributes_in_the_state_load_ghosts_and_show_checkouts(open_db, db_path,
                                                                        start_thread):
    db = open_db()
    db.elect(PersistentDict(folder=Located("folder", None)))
    transaction.commit()
    db.close()
    folder = open_db(db_path).root["folder"]
    # Names the class defines come from the class, and load nothing.
    assert folder.__class__ is Located and not isinstance(folder, PersistentDict)
    assert folder.__doc__ == Located.__doc__ and folder._p_ghost
    assert (folder.__name__, folder.__parent__) == ("folder", None)  # loaded on demand
    checkout(folder)
    folder.__name__ = "renamed"
    assert folder.__name__ == "renamed"  # this thread's working copy
    assert start_thread(lambda: folder.__name__).join() == "folder"
    transaction.commit()
    assert start_thread(lambda: folder.__name__).join() == "renamed"


class LocatedWithDefaults(Persistent):
    """zope.location's Location: the names have class-level defaults."""

    __parent__ = None
    __name__ = None

    def __init__(self, name, parent):
        self.__name__ = name
        self.__parent__ = parent


def test_dunder_attributes_with_class_defaults_are_read_from_the_state(open_db, db_path):
    # After a reopen they read the class's None: every Zope location lost.
    db = open_db()
    db.elect(PersistentDict())
    transaction.commit()
    checkout(db.root)
    db.root["folder"] = LocatedWithDefaults("folder", db.root)
    transaction.commit()
    db.close()
    root = open_db(db_path).root
    folder = root["folder"]
    assert folder._p_ghost and folder.__name__ == "folder" and folder.__parent__ is root
    assert LocatedWithDefaults("bare", None).__module__ == __name__  # metadata: the class's


def test_a_dunder_name_the_class_keeps_can_not_be_set_on_an_instance(open_db):
    # It was stored, and never read back: reads go to the class.
    db = open_db()
    db.elect(PersistentDict(folder=Located("folder", None)))
    transaction.commit()
    folder = db.root["folder"]
    checkout(folder)
    for name in ("__doc__", "__module__", "__repr__"):
        with pytest.raises(AttributeError, match="%s is read from the class Located" % name):
            setattr(folder, name, "x")
        with pytest.raises(AttributeError, match="%s is read from the class Located" % name):
            delattr(folder, name)
    folder.__name__ = "renamed"  # a name of the state
    transaction.commit()
    assert folder.__name__ == "renamed" and folder.__doc__ == Located.__doc__


def test_init_runs_once_not_on_load_reopen_or_catch_up(open_db):
    Counted.inits = 0
    db, root = stored_root(open_db)
    checkout(root)
    root.child = Counted(1)
    transaction.commit()
    assert Counted.inits == 1
    oid = root.child._p_oid

    # Load: a fresh instance on the file loads the object without __init__.
    reopened = open_db()
    assert reopened.root.child.value == 1
    assert reopened.get(oid).value == 1
    # Reopen after closing everything.
    reopened.close()
    db.close()
    db = open_db()
    assert db.root.child.value == 1
    # Catch-up: another instance adds an object; this one learns of it.
    other = open_db()
    checkout(other.root)
    other.root.second = Counted(2)
    transaction.commit()
    assert Counted.inits == 2  # the new object's own __init__
    transaction.begin()
    assert db.root.second.value == 2
    assert Counted.inits == 2


def test_init_may_set_attributes_without_checkout(open_db):
    db, root = stored_root(open_db)
    child = CountedChild(3, extra="x")  # nested __init__ through super()
    assert (child.value, child.extra) == (3, "x")
    assert not checked_out(child)
    checkout(root)
    root.child = child  # the child itself is never checked out
    transaction.commit()
    db.close()
    child = open_db().root.child
    assert (type(child), child.value, child.extra) == (CountedChild, 3, "x")


def test_object_is_read_only_after_init():
    obj = CountedChild(1, extra=2)
    with pytest.raises(RuntimeError, match=READ_ONLY):
        obj.value = 5
    with pytest.raises(RuntimeError, match=READ_ONLY):
        obj.extra = 5
    assert (obj.value, obj.extra) == (1, 2)


# -- deletions persist ----------------------------------------------------------

def test_deleted_attribute_stays_deleted_after_reopen(open_db):
    db, root = stored_root(open_db)
    checkout(root)
    root.x, root.y = 1, 2
    transaction.commit()
    checkout(root)
    del root.x
    with pytest.raises(AttributeError):
        del root.missing
    transaction.commit()
    assert not hasattr(root, "x")
    db.close()
    root = open_db().root
    assert not hasattr(root, "x")
    assert root.y == 2


def test_deleted_dict_key_stays_deleted_after_reopen(open_db):
    db, pdict = stored_root(open_db, PersistentDict(a=1, b=2))
    checkout(pdict)
    del pdict["a"]
    transaction.commit()
    assert "a" not in pdict
    db.close()
    assert open_db().root == {"b": 2}


# -- per-thread checkouts ---------------------------------------------------------

def test_checkouts_are_per_thread_and_end_with_each_threads_transaction(
        open_db, start_thread):
    db, root = stored_root(open_db)
    checkout(root)
    root.x = "shared"
    transaction.commit()

    checked_in_thread = threading.Event()
    main_ended = threading.Event()
    thread_ended = threading.Event()

    def other():
        checkout(root)
        root.x = "thread"
        checked_in_thread.set()
        assert main_ended.wait(10)
        # The main thread's transaction ended; ours holds its copy still.
        assert checked_out(root)
        assert root.x == "thread"
        root.x = "thread, again"
        transaction.abort()
        assert not checked_out(root)
        assert root.x == "shared"
        with pytest.raises(RuntimeError, match=READ_ONLY):
            root.x = "after abort"
        thread_ended.set()

    checkout(root)
    root.x = "main"
    thread = start_thread(other)
    assert checked_in_thread.wait(10)
    assert root.x == "main"  # each thread sees its own working copy
    transaction.abort()
    assert not checked_out(root)
    assert root.x == "shared"
    with pytest.raises(RuntimeError, match=READ_ONLY):
        root.x = "main, after abort"
    assert root._p_local  # the other thread still holds its copy
    main_ended.set()
    thread.join()
    assert thread_ended.is_set()
    assert not root._p_local  # nobody holds it: back to the shared state
    assert root.x == "shared"


# -- PersistentDict ---------------------------------------------------------------

def test_dict_constructor_takes_mapping_pairs_and_keywords():
    assert PersistentDict() == {}
    assert PersistentDict({"a": 1}) == {"a": 1}
    assert PersistentDict([("a", 1), ("b", 2)]) == {"a": 1, "b": 2}
    assert PersistentDict(a=1, b=2) == {"a": 1, "b": 2}
    assert PersistentDict({"a": 1}, b=2) == {"a": 1, "b": 2}
    assert PersistentDict([("a", 1)], a=3) == {"a": 3}
    assert PersistentDict(PersistentDict(a=1)) == {"a": 1}
    with pytest.raises(TypeError):
        PersistentDict(1)


def test_dict_reading_api_matches_dict():
    plain = {"a": 1, "b": 2, 3: "c"}
    pdict = PersistentDict(plain)
    assert len(pdict) == 3
    assert pdict == plain and plain == pdict
    assert pdict == PersistentDict(plain)
    assert pdict != {"a": 1} and not pdict != plain
    assert list(pdict) == list(plain)
    assert list(pdict.keys()) == list(plain.keys())
    assert list(pdict.values()) == list(plain.values())
    assert list(pdict.items()) == list(plain.items())
    assert pdict["a"] == 1 and pdict[3] == "c"
    with pytest.raises(KeyError):
        pdict["missing"]
    assert pdict.get("a") == 1
    assert pdict.get("missing") is None
    assert pdict.get("missing", 7) == 7
    assert "a" in pdict and "missing" not in pdict
    assert pdict.copy() == plain and type(pdict.copy()) is dict


def test_dict_views_show_the_items_after_a_checkout_and_a_commit(tmp_path):
    db = Database(str(tmp_path / "views.dobbin"), durability="none")
    pdict = PersistentDict(a=1)
    db.elect(pdict)
    transaction.commit()
    keys, values, items = pdict.keys(), pdict.values(), pdict.items()
    checkout(pdict)  # the thread now reads its own copy of the items
    pdict["b"] = 2
    assert ("b" in keys, len(values), list(items)) == (True, 2, [("a", 1), ("b", 2)])
    transaction.commit()  # and then the committed ones
    assert (sorted(keys), sorted(values), ("b", 2) in items) == (["a", "b"], [1, 2], True)
    assert keys & {"b", "c"} == {"b"} and items - {("a", 1)} == {("b", 2)}
    db.close()


def test_dict_mutating_api_matches_dict_when_checked_out():
    pdict, plain = PersistentDict(a=1, b=2), {"a": 1, "b": 2}
    checkout(pdict)
    for target in (pdict, plain):
        target["c"] = 3
        del target["a"]
        assert target.pop("b") == 2
        assert target.pop("b", "default") == "default"
        with pytest.raises(KeyError):
            target.pop("b")
        assert target.setdefault("c", 99) == 3
        assert target.setdefault("d", 4) == 4
        assert target.setdefault("e") is None
        target.update({"f": 6})
        target.update([("g", 7)])
        target.update(h=8)
        target.update({"i": 9}, j=10)
        assert target.popitem() == ("j", 10)  # last in, first out
        target.update(self=11, other=12)  # names of parameters: items all the same
        assert [target.popitem() for _ in range(2)] == [("other", 12), ("self", 11)]
    assert pdict == plain
    assert PersistentDict(self=1, other=2) == {"self": 1, "other": 2}
    assert list(pdict.items()) == list(plain.items())
    pdict.clear()
    assert pdict == {} and len(pdict) == 0
    with pytest.raises(KeyError):
        pdict.popitem()
    with pytest.raises(KeyError):
        del pdict["a"]


MUTATIONS = {
    "setitem": lambda d: d.__setitem__("a", 0),
    "setitem new key": lambda d: d.__setitem__("new", 0),
    "delitem": lambda d: d.__delitem__("a"),
    "clear": lambda d: d.clear(),
    "pop": lambda d: d.pop("a"),
    "pop missing with default": lambda d: d.pop("missing", None),
    "popitem": lambda d: d.popitem(),
    "setdefault existing": lambda d: d.setdefault("a", 0),
    "setdefault new": lambda d: d.setdefault("new", 0),
    "update mapping": lambda d: d.update({"a": 0}),
    "update pairs": lambda d: d.update([("a", 0)]),
    "update keywords": lambda d: d.update(a=0),
    "ior": lambda d: d.__ior__({"a": 0}),
}


@pytest.mark.parametrize("mutate", list(MUTATIONS.values()), ids=list(MUTATIONS))
def test_dict_not_checked_out_refuses_every_mutation(mutate):
    pdict = PersistentDict(a=1, b=2)
    with pytest.raises(RuntimeError, match=READ_ONLY):
        mutate(pdict)
    assert pdict == {"a": 1, "b": 2}


@pytest.mark.parametrize("mutate", list(MUTATIONS.values()), ids=list(MUTATIONS))
def test_stored_dict_not_checked_out_refuses_every_mutation(mutate, open_db):
    _db, pdict = stored_root(open_db, PersistentDict(a=1, b=2))
    with pytest.raises(RuntimeError, match=READ_ONLY):
        mutate(pdict)
    assert pdict == {"a": 1, "b": 2}


def test_dict_union_reversed_and_fromkeys_match_dict():
    assert PersistentDict.fromkeys("xy") == {"x": None, "y": None}
    pdict = PersistentDict(a=1, b=2)
    assert pdict | {"c": 3} == {"a": 1, "b": 2, "c": 3}
    assert {"c": 3} | pdict == {"c": 3, "a": 1, "b": 2}
    assert list(reversed(pdict)) == ["b", "a"]
    assert PersistentDict.fromkeys("xy", 0) == {"x": 0, "y": 0}
    checkout(pdict)
    pdict |= {"c": 3}
    assert pdict == {"a": 1, "b": 2, "c": 3}


def test_dict_items_and_attributes_stay_independent_through_reopen(open_db):
    db, root = stored_root(open_db)
    pdict = PersistentDict(name="item")
    checkout(root)
    checkout(pdict)
    root.pdict = pdict
    pdict.name = "attribute"
    pdict["obj"] = root
    transaction.commit()
    assert pdict["name"] == "item" and pdict.name == "attribute"
    db.close()
    root = open_db().root
    pdict = root.pdict
    assert type(pdict) is PersistentDict
    assert pdict.name == "attribute"
    assert set(pdict) == {"name", "obj"}
    assert pdict["name"] == "item"
    assert pdict["obj"] is root
    assert not hasattr(pdict, "obj")


class _PlainBase:
    def __init__(self, x=1):
        self.x = x


class _Mixed(_PlainBase, Persistent):
    """Its __init__ is inherited from a class that is not persistent."""


class _MixedChild(_Mixed):
    pass


@dataclasses.dataclass
class _Data(Persistent):
    """Its __init__ is made by @dataclass after the class was created."""

    x: int = 0
    tags: list = dataclasses.field(default_factory=list)


def test_inherited_and_generated_inits_may_set_attributes(open_db):
    mixed, child, data = _Mixed(2), _MixedChild(), _Data(3, ["a"])
    assert (mixed.x, child.x, data.x, data.tags) == (2, 1, 3, ["a"])
    assert _PlainBase.__init__ is not _Mixed.__init__  # the plain base is left alone
    with pytest.raises(RuntimeError):
        data.x = 4  # read-only once __init__ returned, as always
    db = open_db()
    db.elect(PersistentDict(mixed=mixed, child=child, data=data))
    transaction.commit()
    db.close()
    root = open_db().root
    assert (root["mixed"].x, root["child"].x, root["data"]) == (2, 1, _Data(3, ["a"]))


class _Pickles:
    """A mixin of the kind pickle honours, and Dobbin would not."""

    def __getstate__(self):
        return {"balance": 0}

    def __setstate__(self, state):
        self.__dict__.update(state, restored=True)


@pytest.mark.parametrize("namespace, bases, message", [
    ({"__getstate__": lambda self: {}}, (Persistent,), "__getstate__ .from Account"),
    ({"__setstate__": lambda self, state: None}, (Persistent,), "__setstate__ .from Account"),
    ({}, (Persistent, _Pickles), "__getstate__ .from _Pickles"),
    ({}, (PersistentDict, _Pickles), "__getstate__ .from _Pickles"),
])
def test_a_persistent_class_may_not_have_getstate_or_setstate(namespace, bases, message):
    # They were ignored: a stored state is the instance dict as it is.
    with pytest.raises(TypeError, match="may not have " + message):
        type("Account", bases, namespace)


@pytest.mark.parametrize("slots", ["balance", ("balance", "owner")])
def test_a_persistent_class_may_not_declare_slots(slots):
    # Slot values would be shared by every thread and never stored.
    with pytest.raises(TypeError, match="may not declare __slots__"):
        type("Account", (Persistent,), {"__slots__": slots})


class EmptySlots(Persistent):
    __slots__ = ()


class SlotlessAccount(EmptySlots):
    pass


def test_a_persistent_class_may_declare_empty_slots(open_db):
    db = open_db()
    db.elect(SlotlessAccount())
    transaction.commit()
    checkout(db.root)
    db.root.balance = 5
    transaction.commit()
    assert db.root.balance == 5


@pytest.mark.parametrize("value", [{}, 5, None, object()])
def test_state_of_something_not_persistent_is_a_type_error(value):
    with pytest.raises(TypeError, match="is not a persistent object"):
        state_of(value)


class Child(Persistent):
    def __init__(self, value):
        self.value = value
        self.padding = "c" * 200


class Parent(Persistent):
    calls = 0

    def __init__(self, count):
        self.children = [Child(i) for i in range(count)]

    @property
    def total(self):
        type(self).calls += 1
        total = sum(child.value for child in self.children)
        type(self).evicted_itself = self._p_ghost
        return total


def test_a_property_reading_more_than_the_cache_holds_runs_once(tmp_path):
    # Its reads evict its own object: the lookup saw a ghost after it and
    # ran the property again, for ever (RecursionError after ~1000 runs).
    path = str(tmp_path / "db.dobbin")
    db = Database(path, durability="none")
    db.elect(Parent(500))
    transaction.commit()
    db.close()
    db = Database(path, durability="none", cache_size=100_000)
    try:
        parent = db.root
        Parent.calls = 0
        assert parent.total == sum(range(500))
        assert Parent.calls == 1
        assert Parent.evicted_itself  # by the property's own reads, indeed
        assert not parent._p_ghost and len(parent.children) == 500
    finally:
        db.close()


class Other(Persistent):
    pass


def test_vars_shows_what_attribute_reads_show(tmp_path):
    # Evicted, it showed {}; checked out, the committed state and not the
    # thread's changes.
    path = str(tmp_path / "db.dobbin")
    db = Database(path, durability="none", cache_size=4000)
    try:
        db.elect(PersistentDict(children=[Child(i) for i in range(20)]))
        transaction.commit()
        first, *others = db.root["children"]
        assert vars(first)["value"] == 0
        for child in others:
            child.value  # their loads evict the first
        assert first._p_ghost
        assert vars(first) == {"value": 0, "padding": "c" * 200}
        assert "value" in dir(first)
        checkout(first)
        first.value = 10
        assert vars(first)["value"] == 10
        first.__dict__["padding"] = "changed in place"
        transaction.commit()
        assert (first.value, first.padding) == (10, "changed in place")
    finally:
        db.close()


def test_the_class_of_a_stored_object_can_t_be_assigned(open_db):
    db = open_db()
    db.elect(Child(2))
    transaction.commit()
    checkout(db.root)
    with pytest.raises(AttributeError, match="class of stored object .* can't be changed"):
        db.root.__class__ = Other
    assert type(db.root) is Child
    transaction.abort()


def test_assigning_dict_replaces_the_threads_working_copy(open_db, start_thread):
    # It replaced the state every thread shares: others saw the uncommitted
    # value at once, and the commit stored the working copy, losing it.
    db = open_db()
    root = Persistent()
    checkout(root)
    root.a = 1
    db.elect(root)
    transaction.commit()
    checkout(root)
    root.__dict__ = {"a": 3, "b": 4}
    seen = []
    start_thread(lambda: seen.append(vars(root).copy())).join()
    assert seen == [{"a": 1}] and vars(root) == {"a": 3, "b": 4}
    root.__dict__ = root.__dict__  # its own items: kept
    transaction.commit()
    assert (root.a, root.b) == (3, 4) and db.load_state(root._p_oid)[1] == {"a": 3, "b": 4}
    with pytest.raises(RuntimeError, match="read-only"):
        root.__dict__ = {}  # not checked out
    checkout(root)
    with pytest.raises(TypeError, match="dictionary"):
        root.__dict__ = [("a", 5)]
    transaction.abort()
