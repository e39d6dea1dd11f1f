"""broker.protocol: every request is checked field by field; frames and replies too."""

import pytest

from broker import protocol
from broker.codec import ABSENT
from broker.exc import ProtocolError
from broker.keys import Key, KeyRing

KEY = KeyRing(b"p" * 32).sign("o", 1)
TOKEN = b"t" * 16


def request(op, **fields):
    body = {"id": 1, "op": op}
    body.update(fields)
    return body


VALID = [
    request("hello"),
    request("ping"),
    request("sync", since=None),
    request("sync", since=5),
    request("load", key=KEY, tx=3),
    request("meta", **{"class": "a.B"}),
    request("static", path=["root", 1]),
    request("item", key=KEY, tx=1, item=("any", "value")),
    request("items", key=KEY, tx=1, start=0, limit=None),
    request("commit", tx=1, since=1, token=b"t" * 16, new=[[1, "a.B", {"x": 1}]],
            set=[[KEY, "x", ABSENT, 2]], **{"del": [[KEY, "y", 1]]},
            setitem=[[KEY, "k", ABSENT, 1]], delitem=[[KEY, "k", 1]]),
    request("call", name="hello", args=[1], kwargs={"a": 1}, token=TOKEN),
    request("invoke", key=KEY, tx=1, method="shout", args=[], kwargs={}, token=TOKEN),
    request("search", target=KEY, tx=1, mode="find", query={"name": "x"}, limit=10),
    request("search", target="mod.Class", tx=1, mode="count", query={}, limit=None),
    request("stream", key=Key("f", (1, "data"), b"m" * 16), tx=1, offset=0, size=100),
]


@pytest.mark.parametrize("body", VALID, ids=[b["op"] for b in VALID])
def test_valid_requests_pass(body):
    rid, op, fields = protocol.check_request(body)
    assert rid == 1 and op == body["op"]
    assert set(fields) == set(protocol.REQUESTS[op])


def test_every_op_has_a_valid_example():
    assert {b["op"] for b in VALID} == set(protocol.REQUESTS)


def test_inline_ops_are_requests():
    assert protocol.INLINE <= set(protocol.REQUESTS)


@pytest.mark.parametrize("body, message", [
    ([1, 2], "must be a map"),
    ({"op": "ping"}, "field 'id'"),
    ({"id": -1, "op": "ping"}, "field 'id'"),
    ({"id": "1", "op": "ping"}, "field 'id'"),
    ({"id": 1}, "unknown request op"),
    ({"id": 1, "op": "explode"}, "unknown request op 'explode'"),
    ({"id": 1, "op": 7}, "unknown request op 7"),
    (request("ping", extra=1), "unknown field"),
    (request("load", key=KEY), "missing field 'tx'"),
    (request("load", key=KEY, tx=-1), "'tx' must be an int >= 0"),
    (request("load", key=KEY, tx=True), "'tx' must be an int >= 0"),
    (request("load", key="oid 1", tx=1), "'key' must be an object key"),
    (request("load", key=Key("n", 1), tx=1), "'key' must be an object key"),
    (request("static", path=[]), "'path'"),
    (request("static", path=[1.5]), "'path'"),
    (request("items", key=KEY, tx=1, start=0, limit=0), "'limit'"),
    (request("call", name="_private", args=[], kwargs={}, token=TOKEN), "public identifier"),
    (request("call", name="a b", args=[], kwargs={}, token=TOKEN), "public identifier"),
    (request("call", name="x", args={}, kwargs={}, token=TOKEN), "'args' must be a list"),
    (request("call", name="x", args=[], kwargs={"1a": 1}, token=TOKEN), "'kwargs'"),
    (request("search", target=KEY, tx=1, mode="delete", query={}, limit=None), "'mode'"),
    (request("search", target=KEY, tx=1, mode="get", query={"_x": 1}, limit=None), "'query'"),
    (request("search", target=3, tx=1, mode="get", query={}, limit=None), "'target'"),
    (request("stream", key=KEY, tx=1, offset=0, size=10), "stream key"),
    (request("stream", key=Key("f", (1, "d"), b"m" * 16), tx=1, offset=0, size=2 ** 30),
     "'size'"),
    (request("commit", tx=1, since=None, token=b"short", new=[], set=[], delitem=[],
             setitem=[], **{"del": []}), "'token' must be 16 bytes"),
    (request("commit", tx=1, since=None, token=b"t" * 16, new=[[1, "x"]], set=[],
             delitem=[], setitem=[], **{"del": []}), "new[0]"),
    (request("commit", tx=1, since=None, token=b"t" * 16, new=[], set=[[KEY, "_p", 1, 2]],
             delitem=[], setitem=[], **{"del": []}), "set[0][1]"),
    (request("commit", tx=1, since=None, token=b"t" * 16, new=[], set=[["k", "x", 1, 2]],
             delitem=[], setitem=[], **{"del": []}), "set[0][0]"),
])
def test_invalid_requests_are_refused_clearly(body, message):
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        protocol.check_request(body)


def test_request_id_is_recovered_for_error_replies():
    assert protocol.request_id({"id": 9, "op": "nonsense"}) == 9
    assert protocol.request_id({"id": "x"}) is None
    assert protocol.request_id([1]) is None


@pytest.mark.parametrize("frames", [
    [b"peer"], [b"peer", b""], [b"peer", b"", protocol.MAGIC],
    [b"peer", b"x", protocol.MAGIC, b"body"], [b"peer", b"", b"XXXX", b"body"],
    [b"peer", b"", protocol.MAGIC, b"body", b"extra"],
])
def test_wrong_frames_are_refused_with_the_routing_id(frames):
    with pytest.raises(ProtocolError) as info:
        protocol.split_request(frames)
    assert info.value.routing == b"peer"


def test_split_request():
    assert protocol.split_request([b"peer", b"", protocol.MAGIC, b"body"]) == (b"peer", b"body")


def test_replies():
    assert protocol.check_reply(protocol.ok_reply(1, 2, "x")) == (1, 2, True, "x")
    wire = {"type": "KeyError", "message": "'x'"}
    assert protocol.check_reply(protocol.error_reply(None, 2, wire)) == (None, 2, False, wire)
    for bad in ([], {"id": 1}, {"id": "x", "srv": 1, "ok": 1}, {"id": 1, "srv": 1},
                {"id": 1, "srv": 1, "error": {"type": 1, "message": "m"}},
                {"id": 1, "srv": 1, "error": {"type": "T", "message": "m", "evil": 1}}):
        with pytest.raises(ProtocolError):
            protocol.check_reply(bad)


def test_result_shapes():
    protocol.check_result("sync", {"tid": 1, "changed": None, "root": None})
    protocol.check_result("call", object())  # free-form
    with pytest.raises(ProtocolError, match="malformed load reply"):
        protocol.check_result("load", {"class": 1, "serial": 1, "state": {}})


def test_broadcasts():
    protocol.check_broadcast(protocol.invalidation(1, 1, 5, 3, [1, 2]))
    protocol.check_broadcast(protocol.static_invalidation(1, 2, [["root"]]))
    for bad in (None, {"srv": 1}, {"srv": 1, "seq": 1, "tid": "5"},
                {"srv": 1, "seq": 1, "tid": None, "statics": "x"}):
        with pytest.raises(ProtocolError):
            protocol.check_broadcast(bad)
