"""broker.changes: a client transaction's write set, and the values handed to applications."""

from broker.changes import DELETED, LocalChanges, private_copy
from broker.codec import ABSENT
from broker.keys import Key


class FakeProxy:
    def __init__(self, kind, ident):
        self._key = Key(kind, ident)


def test_private_copy_copies_what_can_change_and_keeps_sharing_and_cycles():
    proxy = FakeProxy("o", 1)
    inner = [1, 2]
    value = {"a": inner, "b": (inner, frozenset({3})), "p": proxy, "s": {4}}
    value["self"] = value
    copy = private_copy(value)
    assert copy == {"a": [1, 2], "b": ([1, 2], frozenset({3})), "p": proxy, "s": {4},
                    "self": copy}
    assert copy["a"] is not inner and copy["b"][0] is copy["a"] and copy["self"] is copy
    assert copy["p"] is proxy and copy["s"] is not value["s"]
    copy["a"].append("changed")
    assert inner == [1, 2]
    for immutable in ("text", b"bytes", 5, 1.5, None, True, proxy):
        assert private_copy(immutable) is immutable


def test_a_cycle_through_a_tuple_closes_on_the_tuple_copied():
    # The tuple was copied twice, once inside its own cycle.
    loop = []
    pair = (loop,)
    loop.append(pair)
    copy = private_copy(pair)
    assert copy is not pair and copy[0] is not loop
    assert copy[0][0] is copy


def test_the_message_sends_each_change_with_the_first_old_value():
    changes = LocalChanges()
    assert not changes
    stored, mapping, new = FakeProxy("o", 1), FakeProxy("o", 2), FakeProxy("n", 1)
    changes.set_attr(stored, "name", "second", "first")
    changes.set_attr(stored, "name", "third", "second")   # the old value stays "first"
    changes.set_attr(stored, "gone", DELETED, "was")
    changes.add_new(1, new, "mod.Item")
    changes.set_attr(new, "name", "made", ABSENT)
    changes.set_item(mapping, "k", 1, ABSENT)
    changes.set_item(mapping, "old", DELETED, "v")
    changes.set_item(mapping, "never", DELETED, ABSENT)  # nothing to delete
    assert changes and changes.get_attr(stored, "name", None) == "third"
    assert changes.message() == {
        "new": [[1, "mod.Item", {"name": "made"}]],
        "set": [[stored._key, "name", "first", "third"]],
        "del": [[stored._key, "gone", "was"]],
        "setitem": [[mapping._key, "k", ABSENT, 1]],
        "delitem": [[mapping._key, "old", "v"]],
    }
    changes.clear()
    assert not changes and changes.message()["set"] == []
