"""Tests of dobbin.serialize: each record is pickled on its own (no memo
shared across records), references go through the caller's hooks, and
records that can't be loaded are reported as LoadError."""

import gc
import io
import pickle
import pickletools
import sys

import pytest
import transaction

from dobbin.broken import BrokenPersistent
from dobbin.exc import LoadError, UnstorableError
from dobbin.persistent import Persistent, checkout
from dobbin.serialize import RENEW_AFTER, StateWriter, load_state


class Ref:
    """Stands for a persistent reference in unit tests."""

    def __init__(self, oid):
        self.oid = oid


def ref_id(value):
    return ("ref", value.oid) if isinstance(value, Ref) else None


class IdsUnpickler(pickle.Unpickler):
    """Plain pickle, references left as ids.  (Python 3.13 made the hooks of
    pickle's own Pickler and Unpickler instances read-only: subclass them.)"""

    def persistent_load(self, pid):
        return pid


class IdsPickler(pickle.Pickler):
    """Plain pickle, references written as persistent ids (the older form)."""

    def persistent_id(self, value):
        return ref_id(value)


def load_alone(data):
    """Unpickle one record with pickle only, references left as ids."""
    return IdsUnpickler(io.BytesIO(data)).load()


def test_records_written_by_one_writer_load_alone():
    shared = ["shared", {"deep": [1, 2]}]
    writer = StateWriter(ref_id)
    first = writer.dump(Persistent, {"items": shared, "other": Ref(7)})
    second = writer.dump(Persistent, {"items": shared, "again": shared})
    # The second record repeats the list rather than pointing into the
    # first record's memo: loaded alone, each has the whole value.
    assert load_alone(second) == (Persistent, {"items": shared, "again": shared})
    assert load_alone(first) == (Persistent, {"items": shared, "other": ("ref", 7)})
    cls, state = load_alone(second)
    assert state["items"] is state["again"]  # sharing inside one record is kept
    assert writer.dump(Persistent, {"items": shared, "again": shared}) == second


def test_load_state_turns_ids_back_into_objects():
    target = object()
    data = StateWriter(ref_id).dump(Persistent, {"other": Ref(3), "n": 1})
    loaded = []

    def persistent_load(pid):
        loaded.append(pid)
        return target

    assert load_state(data, persistent_load) == (Persistent, {"other": target, "n": 1})
    assert loaded == [("ref", 3)]


def test_loading_a_state_with_references_leaves_no_cycle_behind():
    # Each record's unpickler, memo and all, was once freed only by the
    # cyclic collector: a scan of a big tree spent a fifth of its time there.
    data = StateWriter(ref_id).dump(Persistent, {"other": Ref(3), "more": [Ref(4)]})
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(10):
            load_state(data, lambda pid: pid)
        gc.collect()
        left = [type(obj).__name__ for obj in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert "_StateUnpickler" not in left


@pytest.mark.parametrize("data", [
    b"not a pickle",
    pickle.dumps((Persistent, {"a": 1}))[:-5],               # truncated
    pickle.dumps(("not a class", {"a": 1})),
    pickle.dumps((Persistent, ["not", "a", "dict"])),
    pickle.dumps([Persistent, {}, "three"]),
], ids=["garbage", "truncated", "no class", "no dict", "not a pair"])
def test_load_state_reports_bad_records_as_load_error(data):
    with pytest.raises(LoadError, match="oid 5"):
        load_state(data, lambda pid: pid, "of oid 5")


def test_objects_sharing_a_list_are_stored_in_separate_records(open_db):
    db = open_db()
    root = Persistent()
    db.elect(root)
    transaction.commit()
    first, second = Persistent(), Persistent()
    shared = ["one", "two"]
    checkout(root)
    checkout(first)
    checkout(second)
    root.children = [first, second]
    first.items = shared
    second.items = shared
    transaction.commit()

    records = {}
    for obj in (first, second):
        _tid, _previous, data = db._log.read_object(db._index.offset_of(obj._p_oid), obj._p_oid)
        records[obj._p_oid] = data
    # Each record's bytes load with pickle alone, without the other's.
    for data in records.values():
        assert load_alone(data) == (Persistent, {"items": ["one", "two"]})

    db.close()
    reopened = open_db()
    first, second = reopened.root.children
    # Documented behaviour: a plain list shared by two objects is stored
    # once per object, so after a reload each object has its own copy.
    assert first.items == second.items == ["one", "two"]
    assert first.items is not second.items
    checkout(first)
    first.items.append("three")
    transaction.commit()
    assert second.items == ["one", "two"]


class Outer:
    class Inner(Persistent):
        """A nested class: its pickle names it by a dotted qualified name."""


def test_classes_load_from_imported_modules_and_by_import(tmp_path, monkeypatch):
    module = tmp_path / "dobbin_test_fresh_module.py"
    module.write_text("from dobbin.persistent import Persistent\n"
                      "class Fresh(Persistent):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    fresh = importlib.import_module("dobbin_test_fresh_module").Fresh
    writer = StateWriter(lambda value: None)
    records = [writer.dump(cls, {"n": 1}) for cls in (Persistent, Outer.Inner, fresh)]
    missing = records[2].replace(b"Fresh", b"Gone!")
    monkeypatch.delitem(sys.modules, "dobbin_test_fresh_module")  # not imported yet
    loaded = [load_state(data, lambda pid: pid)[0] for data in records]
    assert loaded[:2] == [Persistent, Outer.Inner]
    assert loaded[2].__module__ == "dobbin_test_fresh_module" and loaded[2].__name__ == "Fresh"
    assert "dobbin_test_fresh_module" in sys.modules  # imported on demand
    # A class gone from the code loads as a stand-in (see test_broken).
    stand_in, _state = load_state(missing, lambda pid: pid, "of oid %d", 9)
    assert issubclass(stand_in, BrokenPersistent) and stand_in.__name__ == "Gone!"


def test_references_are_calls_and_older_persistent_ids_load_the_same():
    target = object()
    resolved = []

    def persistent_load(pid):
        resolved.append(pid)
        return target

    data = StateWriter(ref_id).dump(Persistent, {"other": Ref(3), "n": 1})
    opcodes = {op.name for op, _arg, _pos in pickletools.genops(data)}
    assert "REDUCE" in opcodes and "BINPERSID" not in opcodes
    older = io.BytesIO()
    IdsPickler(older, 5).dump((Persistent, {"other": Ref(3), "n": 1}))
    for record in (data, older.getvalue()):
        assert load_state(record, persistent_load) == (Persistent, {"other": target, "n": 1})
    assert resolved == [("ref", 3), ("ref", 3)]


def test_only_values_of_other_classes_are_asked_about():
    asked = []

    def reference_id(value):
        asked.append(type(value).__name__)
        return ("ref", value.oid) if isinstance(value, Ref) else None

    StateWriter(reference_id).dump(Persistent, {"name": "x", "n": 1, "tags": ["a", "b"],
                                                "pair": (1.5, None), "other": Ref(2)})
    # The record's class, the reference, and the function that stands for it.
    assert sorted(asked) == ["Ref", "function", "type"]


def test_one_writer_serves_commit_after_commit_with_its_hook_swapped():
    writer = StateWriter(ref_id)
    first = writer.dump(Persistent, {"other": Ref(1)})
    writer.reference_id = lambda value: ("other", value.oid) if isinstance(value, Ref) else None
    second = writer.dump(Persistent, {"other": Ref(1)})
    assert load_alone(first)[1] == {"other": ("ref", 1)}
    assert load_alone(second)[1] == {"other": ("other", 1)}


def test_after_a_long_record_the_writer_starts_afresh_keeping_its_hook():
    # Clearing a pickler's memo costs the size its table grew to, and it
    # never shrinks: after one state of 900,000 strings, every later small
    # commit of the database took 45 times as long.
    writer = StateWriter(ref_id)
    pickler = writer._pickler
    writer.dump(Persistent, {"a": 1, "other": Ref(2)})
    assert writer._pickler is pickler  # short: the same pickler goes on
    long_record = writer.dump(Persistent, {"many": [str(i) for i in range(100000)]})
    assert len(long_record) > RENEW_AFTER and writer._pickler is not pickler
    assert sys.getsizeof(writer._buffer) < RENEW_AFTER  # nor is its room kept
    assert load_alone(writer.dump(Persistent, {"other": Ref(3)}))[1] == {"other": ("ref", 3)}
    pickler = writer._pickler
    with pytest.raises(UnstorableError):
        writer.dump(Persistent, {"many": [str(i) for i in range(100000)] + [lambda: 0]})
    assert writer._pickler is not pickler  # a failed one may have grown the memo too


def test_a_state_nested_past_the_recursion_limit_is_unstorable():
    value = []
    for _ in range(100000):
        value = [value]
    with pytest.raises(UnstorableError, match="cannot store a Persistent"):
        StateWriter(ref_id).dump(Persistent, {"deep": value})


class RefusesToPickle:
    def __reduce__(self):
        raise ValueError("holds a live connection")


def test_a_value_whose_reduce_raises_is_unstorable_naming_the_class():
    # Its own ValueError came out of commit(), naming neither the value
    # nor the object being stored.
    with pytest.raises(UnstorableError, match="cannot store a Persistent: ValueError: holds"):
        StateWriter(ref_id).dump(Persistent, {"connection": RefusesToPickle()})
