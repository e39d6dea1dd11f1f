"""broker.server: serving, hostile input, hidden fields, statics, several servers, clean stop."""

import os
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import transaction
import zmq
import zmq.utils.z85
from zope.interface.verify import verifyObject

from broker import endpoints, exc, protocol
from broker import outcomes as outcomes_module
from broker import server as server_module
from broker.client import BrokerClient
from broker.changes import DELETED
from broker.codec import ABSENT, Codec
from broker.interfaces import IBrokerServer
from broker.keys import Key
from broker.server import INLINE_COMMIT, PUSH_OBJECTS, BrokerServer
from broker.states import Record, unseal
from broker_fixtures import (TIMEOUT, Folder, Item, Profile, ServerProcess,  # noqa: F401
                             TestServer, broker, configure, make_database, served,
                             wait_until)
from conftest import append_record, child_env, flip_bit
from dobbin.database import Database
from dobbin.log import COMMITTED, MetaEntry
from dobbin.btree import OOBTree
from dobbin.persistent import PersistentDict, checkout

codec = Codec()


class RawPeer:
    """A bare DEALER socket speaking (or not) the protocol."""

    def __init__(self, address):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def send(self, *frames):
        self.socket.send_multipart(list(frames))

    def request(self, body):
        self.send(b"", protocol.MAGIC, body if isinstance(body, bytes) else codec.encode(body))
        return self.reply()

    def reply(self, timeout=TIMEOUT):
        if not self.socket.poll(timeout * 1000):
            return None
        frames = self.socket.recv_multipart()
        assert frames[:2] == [b"", protocol.MAGIC] and len(frames) == 3
        return codec.decode(frames[2])

    def close(self):
        self.socket.close(0)
        self.context.term()


@pytest.fixture
def peer(broker):
    _db, server, _connect = broker
    p = RawPeer(server.address)
    yield p
    p.close()


def test_implements_interface(broker):
    _db, server, _connect = broker
    assert verifyObject(IBrokerServer, server)


def test_ping_and_hello(peer, broker):
    _db, server, _connect = broker
    assert peer.request({"id": 1, "op": "ping"}) == {"id": 1, "srv": server.instance, "ok": None}
    hello = peer.request({"id": 2, "op": "hello"})["ok"]
    assert hello["broadcast"] == server.broadcast_address
    assert hello["version"] == protocol.VERSION == 2
    assert isinstance(hello["root"], Key)


def error_of(reply):
    assert reply is not None, "no reply"
    assert "ok" not in reply
    return reply["error"]["type"], reply["error"]["message"]


HOSTILE_BODIES = [
    (os.urandom(64), "DecodeError"),
    (b"\xdd\xff\xff\xff\xff", "DecodeError"),                  # array of 4G items
    (b"\xdb\xff\xff\xff\xff" + b"x" * 10, "DecodeError"),       # str of 4 GB
    (b"\xc6\xff\xff\xff\xff", "DecodeError"),                  # bin of 4 GB
    (msgpack.packb(msgpack.ExtType(77, b"??")), "DecodeError"),  # unknown ext type
    (msgpack.packb([1, 2]), "ProtocolError"),
    (msgpack.packb({"id": 1, "op": "drop_tables"}), "ProtocolError"),
    (msgpack.packb({"id": 1, "op": "load", "key": 5, "tx": 1}), "ProtocolError"),
    (msgpack.packb({"id": 1, "op": "ping", "evil": True}), "ProtocolError"),
    (codec.encode({"id": 1, "op": "load", "key": Key("o", 1, b"\x00" * 16), "tx": 1}),
     "AccessDenied"),
    (codec.encode({"id": 1, "op": "call", "name": "__init__", "args": [], "kwargs": {},
                   "token": b"c" * 16}),
     "ProtocolError"),
]


@pytest.mark.parametrize("body, error_type", HOSTILE_BODIES)
def test_hostile_bodies_get_an_error_and_the_server_keeps_serving(peer, body, error_type):
    reply = peer.request(body)
    assert error_of(reply)[0] == error_type
    assert "Traceback" not in repr(reply)
    assert peer.request({"id": 5, "op": "ping"})["ok"] is None


@pytest.mark.parametrize("frames", [
    [b"random"], [os.urandom(32), os.urandom(32)], [b"", protocol.MAGIC],
    [b"", b"WRONG", b"x"], [b"", protocol.MAGIC, b"x", b"y"], [b"", protocol.MAGIC] + [b"z"] * 50,
])
def test_wrong_frame_counts_get_an_error(peer, frames):
    peer.send(*frames)
    error_type, message = error_of(peer.reply())
    assert error_type == "ProtocolError" and "frame" in message
    assert peer.request({"id": 5, "op": "ping"})["ok"] is None


def test_a_burst_of_garbage_is_answered_message_by_message(peer):
    for n in range(50):
        peer.send(b"", protocol.MAGIC, os.urandom(n))
    replies = [peer.reply() for _ in range(50)]
    assert all(r is not None and "error" in r for r in replies)
    assert peer.request({"id": 99, "op": "ping"})["ok"] is None


def item_key(peer):
    """(the root item's key, the snapshot's tid), as a raw peer learns them."""
    hello = peer.request({"id": 1, "op": "hello"})["ok"]
    root = peer.request({"id": 2, "op": "load", "key": hello["root"], "tx": hello["tid"]})["ok"]
    return root["state"]["item"], hello["tid"]


def things_key(peer):
    hello = peer.request({"id": 1, "op": "hello"})["ok"]
    root = peer.request({"id": 2, "op": "load", "key": hello["root"], "tx": hello["tid"]})["ok"]
    return root["state"]["things"], hello["tid"]


def test_an_unhashable_item_is_refused_without_echoing_it_and_the_front_thread_lives(peer,
                                                                                   broker):
    # The missing item's repr (20 MB) once made the error reply unencodable,
    # which killed the front thread: nobody was answered again.
    things, tid = things_key(peer)
    reply = peer.request({"id": 3, "op": "item", "key": things, "tx": tid,
                          "item": [b"\0" * 5_000_000]})
    error_type, message = error_of(reply)
    assert error_type == "ProtocolError" and "unhashable" in message and len(message) < 200
    assert peer.request({"id": 4, "op": "ping"})["ok"] is None


def test_an_error_too_big_to_send_leaves_the_workers_serving(peer, broker):
    # A conflict naming a huge item, once per worker: each used to kill one.
    _db, server, connect = broker
    things, tid = things_key(peer)
    for n in range(server.workers + 1):
        reply = peer.request({"id": 10 + n, "op": "commit", "tx": tid, "since": tid,
                              "token": b"t%015d" % n, "new": [], "set": [], "del": [],
                              "delitem": [],
                              "setitem": [[things, (b"\0" * 5_000_000,), "wrong", 1]]})
        error_type, message = error_of(reply)
        assert error_type == "ConflictError" and len(message) < 2000
        assert len(reply["error"]["info"]["field"]) < 2000
    assert connect().call("hello", "you") == "hello you"


def renaming_commit(peer):
    """(an encoded commit renaming the root item "first" -> "second", its tid)."""
    hello = peer.request({"id": 1, "op": "hello"})["ok"]
    tid = hello["tid"]
    root = peer.request({"id": 2, "op": "load", "key": hello["root"], "tx": tid})["ok"]
    return codec.encode({"id": 3, "op": "commit", "tx": tid, "since": tid,
                         "token": b"k" * 16, "new": [], "del": [], "setitem": [],
                         "delitem": [], "set": [[root["state"]["item"], "name", "first",
                                                 "second"]]}), tid


def test_a_commit_sent_twice_runs_once_and_both_copies_get_its_reply(peer, broker):
    db, _server, _connect = broker
    commit, tid = renaming_commit(peer)
    # The second copy comes while the first is queued, running or done.
    peer.send(b"", protocol.MAGIC, commit)
    peer.send(b"", protocol.MAGIC, commit)
    first, second = peer.reply(), peer.reply()
    assert "ok" in first and first == second
    assert first["ok"]["tid"] == tid + 1
    # A copy after the outcome is known gets it too; the change was made once.
    assert peer.request(commit) == first
    transaction.begin()
    assert db.sync() == tid + 1 and db.root.item.name == "second"


def test_a_write_whose_reply_gave_way_to_others_is_not_run_again(peer, broker):
    # Another client's big commits pushed a small outcome out within a
    # second; its copy (sent after a lost reply) ran again: a commit was
    # answered ConflictError though it was stored, and a call ran twice.
    db, server, _connect = broker
    commit, tid = renaming_commit(peer)
    call = codec.encode({"id": 4, "op": "call", "name": "rename", "args": ["third"],
                         "kwargs": {}, "token": b"c" * 16})
    assert peer.request(commit)["ok"]["tid"] == tid + 1
    assert peer.request(call)["ok"] == "third"
    # The next outcome passes the bound; the three records fit under it.
    server._outcomes.hard_max_bytes = 3 * outcomes_module.ENTRY_COST + 10
    assert peer.request({"id": 5, "op": "call", "name": "rename", "args": ["fourth"],
                         "kwargs": {}, "token": b"o" * 16})["ok"] == "fourth"
    again = peer.request(commit)
    assert again["ok"]["tid"] >= tid + 3 and again["ok"]["states"] == []
    error_type, message = error_of(peer.request(call))
    assert error_type == "ResultLost" and "'rename' ran already (transaction %d)" % (tid + 2) \
        in message
    transaction.begin()
    assert db.sync() == tid + 3
    assert db.root.item.name == "fourth" and db.root.item.renames == 2


@pytest.mark.parametrize("write", ["commit", "invoke"])
def test_a_write_whose_reply_is_late_is_sent_again_and_runs_once(tmp_path, write):
    # The client gives up waiting and sends it again.  The server once ran
    # both copies: a commit's second failed on the first's change (a false
    # conflict), and an invoke ran its method twice.
    db = make_database(str(tmp_path / "test.dobbin"))
    with served(db, workers=1) as server:
        busy = RawPeer(server.address)
        client = BrokerClient(server.address, timeout=0.3, retries=6)
        try:
            item = client.root.item
            busy.send(b"", protocol.MAGIC, codec.encode(
                {"id": 1, "op": "call", "name": "sleep", "args": [1.0], "kwargs": {},
                 "token": b"s" * 16}))
            # Requests on two connections may arrive in either order.
            assert wait_until(lambda: server._work.unfinished_tasks)
            if write == "commit":
                item.name = "again"
                client.commit()
            else:
                assert item.rename("again") == "again"
            assert client._conn.reconnects >= 1  # it was sent again
            assert busy.reply(3) is not None
            client.begin()
            assert item.name == "again"
            if write == "invoke":
                assert item.renames == 1
        finally:
            client.close()
            busy.close()
    db.close()


@pytest.mark.parametrize("op", ["call", "invoke"])
def test_a_write_call_sent_twice_runs_once_and_both_copies_get_its_result(peer, broker, op):
    db, _server, _connect = broker
    hello = peer.request({"id": 1, "op": "hello"})["ok"]
    tid = hello["tid"]
    root = peer.request({"id": 2, "op": "load", "key": hello["root"], "tx": tid})["ok"]
    target = ({"name": "rename"} if op == "call" else
              {"key": root["state"]["item"], "tx": tid, "method": "rename"})
    request = codec.encode(dict(target, id=3, op=op, args=["renamed"], kwargs={},
                                token=b"w" * 16))
    peer.send(b"", protocol.MAGIC, request)
    peer.send(b"", protocol.MAGIC, request)
    first, second = peer.reply(), peer.reply()
    assert first["ok"] == "renamed" and first == second
    assert peer.request(request) == first
    # Another token is another call.
    assert peer.request(dict(codec.decode(request), token=b"x" * 16))["ok"] == "renamed"
    transaction.begin()
    db.sync()
    assert db.root.item.renames == 2


@pytest.mark.parametrize("result, refusal", [
    (lambda: [0] * 1_100_000, "more than 1000000 items"),
    (lambda: Item("never stored"), "an object of type Item is neither stored nor static"),
])
def test_a_write_whose_result_cannot_be_sent_runs_once_and_every_copy_hears_so(
        peer, broker, result, refusal):
    # It committed, then its result failed to encode: the error was not
    # remembered, and each copy of the request ran the method again.
    db, server, connect = broker

    def do_rename_lost(name):
        server.db.root.item.rename(name)
        return result()

    server.do_rename_lost = do_rename_lost
    request = codec.encode({"id": 3, "op": "call", "name": "rename_lost", "args": ["lost"],
                            "kwargs": {}, "token": b"l" * 16})
    first = peer.request(request)
    error_type, message = error_of(first)
    assert error_type == "ResultLost" and "ran and committed" in message and refusal in message
    assert " at 0x" not in message
    assert peer.request(request) == first and peer.request(request) == first
    with pytest.raises(exc.ResultLost, match="'rename_lost' ran and committed"):
        connect().call("rename_lost", "again")
    transaction.begin()
    db.sync()
    assert db.root.item.renames == 2 and db.root.item.name == "again"


@pytest.mark.parametrize("name, args, outcome", [
    # 10,001 calls of a missing method took 0.7 s and pushed out every
    # other client's outcome: failed writes are not remembered at all.
    ("missing", [], "AttributeError"),
    # Counted alone, quick successful calls did the same within seconds:
    # an outcome is kept for 60 s whatever the count.
    ("hello", ["x"], "hello x"),
])
def test_a_burst_of_writes_cannot_push_out_another_client_s_outcome(
        peer, broker, name, args, outcome):
    db, server, _connect = broker
    server._outcomes.max_entries = 20
    rename = codec.encode({"id": 1, "op": "call", "name": "rename", "args": ["once"],
                           "kwargs": {}, "token": b"r" * 16})
    assert peer.request(rename)["ok"] == "once"
    for n in range(60):
        reply = peer.request({"id": 2 + n, "op": "call", "name": name, "args": args,
                              "kwargs": {}, "token": b"b%015d" % n})
        assert (error_of(reply)[0] if "error" in reply else reply["ok"]) == outcome
    assert peer.request(rename)["ok"] == "once"  # answered, not run again
    transaction.begin()
    db.sync()
    assert db.root.item.renames == 1


def test_an_application_method_exiting_leaves_its_worker_serving(broker):
    _db, server, connect = broker
    client = connect()
    server.do_quit = sys.exit  # in an application, a stray sys.exit()
    for _ in range(server.workers + 1):
        with pytest.raises(exc.RemoteError, match="SystemExit"):
            client.call("quit", "bye")
    assert client.call("hello", "still") == "hello still"


def test_a_read_of_an_old_version_is_answered_by_a_worker(peer, broker, monkeypatch):
    # Stepping back through 60,000 versions of a hot object took 144 ms of
    # the front thread, and every other client's quick reads waited.
    db, server, _connect = broker
    item, tid = item_key(peer)
    for name in ("second", "third"):
        checkout(db.root.item)
        db.root.item.name = name
        transaction.commit()
    server.sync_database()
    threads = []
    load = server._ops["load"]

    def op_load(f):
        threads.append(threading.current_thread().name)
        return load(f)

    monkeypatch.setitem(server._ops, "load", op_load)
    old = peer.request({"id": 3, "op": "load", "key": item, "tx": tid})["ok"]
    new = peer.request({"id": 4, "op": "load", "key": item, "tx": tid + 2})["ok"]
    assert old["state"]["name"] != new["state"]["name"] == "third"
    assert peer.request({"id": 5, "op": "load", "key": item, "tx": tid})["ok"] == old
    assert [name.startswith("broker-worker") for name in threads] == [True, False, True]


def test_requests_past_the_queued_bytes_bound_are_refused_busy(tmp_path, monkeypatch):
    # The queue was unbounded: requests decoded far faster than the
    # workers served them took 63 MB each, until memory ran out.
    monkeypatch.setattr(server_module, "MAX_QUEUED_BYTES", 1000)
    db = make_database(str(tmp_path / "test.dobbin"))
    with served(db, workers=1) as server:
        peer = RawPeer(server.address)
        try:
            peer.send(b"", protocol.MAGIC, codec.encode(
                {"id": 1, "op": "call", "name": "sleep", "args": [2.0], "kwargs": {},
                 "token": b"s" * 16}))
            assert wait_until(lambda: server._queued_bytes)
            search = {"id": 2, "op": "search", "target": "broker_fixtures.Item", "tx": 1,
                      "mode": "count", "query": {"name": "x" * 2000}, "limit": None}
            error_type, message = error_of(peer.request(search))
            assert error_type == "Busy" and "requests waiting" in message
            assert peer.reply(5)["ok"] is None  # the sleep
            assert peer.request(search)["ok"]["result"] == 0  # room again
        finally:
            peer.close()
    db.close()


def test_a_request_that_comes_as_the_server_stops_leaves_nothing_queued(tmp_path):
    # One queued after stop() had queued the workers' ends was never run,
    # and its bytes stayed counted: the same server object, started again,
    # refused every request as Busy once such bytes added up.
    db = make_database(str(tmp_path / "test.dobbin"))
    search = {"id": 2, "op": "search", "target": "broker_fixtures.Item", "tx": 1,
              "mode": "count", "query": {"name": "x" * 2000}, "limit": None}
    with served(db, workers=1) as server:
        server._stopping.set()  # what stop() does first
        assert server._queue(b"peer", 1, "search", {}, 100) == (False, None)
        assert server._queued_bytes == 0 and server._work.qsize() == 0
        server.stop()
        server._queued_bytes = server_module.MAX_QUEUED_BYTES  # as if stranded
        server.start()
        peer = RawPeer(server.address)
        try:
            assert peer.request(search)["ok"]["result"] == 0
        finally:
            peer.close()
    db.close()


def rss_mib():
    """This process's resident memory now (the server runs in it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def unread_socket(address, kind, **options):
    """A socket that takes in next to nothing of what it is sent."""
    context = zmq.Context()
    sock = context.socket(kind)
    for option, value in dict(options, LINGER=0, RCVHWM=1, RCVBUF=4096).items():
        sock.setsockopt(getattr(zmq, option), value)
    sock.connect(address)
    return context, sock


def test_replies_a_connection_does_not_read_are_held_only_up_to_a_bound(peer, broker):
    # ZeroMQ's default of 1,000 messages: 400 loads of a 512 KiB object, never
    # read, took 200 MB of the server's memory.
    db, server, _connect = broker
    checkout(db.root.item)
    db.root.item.name = "x" * (512 * 1024)
    transaction.commit()
    item, tid = item_key(peer)
    context, sock = unread_socket(server.address, zmq.DEALER)
    try:
        before = rss_mib()
        for n in range(400):
            sock.send_multipart([b"", protocol.MAGIC, codec.encode(
                {"id": 10 + n, "op": "load", "key": item, "tx": tid})])
        assert wait_until(lambda: server.requests["load"] >= 401)
        assert peer.request({"id": 3, "op": "ping"})["ok"] is None  # all answered by now
        grown = rss_mib() - before
        assert grown < 100, "%.0f MiB held for a connection that reads nothing" % grown
    finally:
        sock.close(0)
        context.term()


FLOOD = """
import sys, time, zmq
context = zmq.Context()
sock = context.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
for n in range(60):
    sock.send_multipart([b"", %r, b"\\x00" * (1024 * 1024)])
print("sent", flush=True)
time.sleep(60)
"""


def test_requests_a_connection_sends_unread_are_taken_in_only_up_to_a_bound(broker,
                                                                           monkeypatch):
    # ZeroMQ's default of 1,000 messages a connection: one peer sending
    # 15 MB requests without reading the replies took the server to 1.6 GB
    # while the front thread decoded the first ones.
    _db, server, _connect = broker
    decoding = threading.Event()
    go_on = threading.Event()
    decode = server._codec.decode

    def slow_decode(data):
        decoding.set()
        go_on.wait(30)
        return decode(data)

    monkeypatch.setattr(server._codec, "decode", slow_decode)
    before = rss_mib()
    flooder = subprocess.Popen([sys.executable, "-c", FLOOD % protocol.MAGIC, server.address],
                               stdout=subprocess.PIPE, env=child_env())
    try:
        assert flooder.stdout.readline() == b"sent\n"
        assert decoding.wait(TIMEOUT)
        grown = wait_until(lambda: rss_mib() - before > 30, timeout=3)
        assert not grown, "%.0f MiB of requests taken in" % (rss_mib() - before)
    finally:
        go_on.set()
        flooder.kill()
        flooder.wait()


def test_big_replies_past_a_connection_s_bound_are_dropped_and_others_served(peer, broker):
    # 64 replies per connection is still 1 GB of 16 MiB objects, and more
    # for each connection opened: big replies not yet sent are bounded in
    # bytes.  Past the bound they are dropped: the client asks again (a
    # Busy error would read as "did not run", and a write would run twice).
    db, server, _connect = broker
    checkout(db.root.item)
    db.root.item.name = "x" * (1024 * 1024)
    transaction.commit()
    server._backlog.max_peer_bytes = 3 * 1024 * 1024
    item, tid = item_key(peer)
    context, sock = unread_socket(server.address, zmq.DEALER)
    try:
        for n in range(20):
            sock.send_multipart([b"", protocol.MAGIC, codec.encode(
                {"id": 10 + n, "op": "load", "key": item, "tx": tid})])
        assert wait_until(lambda: server.requests["load"] >= 21)
        # Another connection is served meanwhile, big replies and all.
        assert len(peer.request({"id": 3, "op": "load", "key": item,
                                 "tx": tid})["ok"]["state"]["name"]) == 1024 * 1024
        replies = []
        while sock.poll(TIMEOUT * 1000):
            replies.append(codec.decode(sock.recv_multipart()[2]))
    finally:
        sock.close(0)
        context.term()
    assert replies and all(len(r["ok"]["state"]["name"]) == 1024 * 1024 for r in replies)
    assert len(replies) + server._backlog.dropped == 20 and server._backlog.dropped


def test_connections_that_never_read_cannot_stop_replies_to_one_that_does(peer, broker):
    # Together they held the bound of all full: every reply to every other
    # client was dropped, for as long as they stayed connected.
    _db, server, connect = broker
    never_done = type("Pending", (), {"done": False})()
    for hoarder in (b"first", b"second"):
        server._backlog.track(hoarder, server._backlog.max_bytes // 2, never_done)
    client = connect()
    for n in range(20):  # small replies, out of the reserve, each sent once read
        assert client.call("hello", str(n)) == "hello %d" % n
        assert peer.request({"id": n, "op": "ping"})["ok"] is None
    assert server._backlog.dropped == 0


def test_a_write_whose_big_reply_was_dropped_is_answered_again_not_run_again(peer, broker):
    db, server, _connect = broker
    server._backlog.max_bytes = 0  # every big reply to a busy connection is dropped
    server._backlog.track(b"someone", 1, type("Pending", (), {"done": False})())
    call = codec.encode({"id": 1, "op": "call", "name": "rename", "args": ["y" * 100_000],
                         "kwargs": {}, "token": b"d" * 16})
    peer.send(b"", protocol.MAGIC, call)
    assert peer.reply(timeout=1) is None and server._backlog.dropped == 1
    server._backlog.max_bytes = 1 << 30
    assert peer.request(call)["ok"] == "y" * 100_000  # the copy the client sends again
    transaction.begin()
    db.sync()
    assert db.root.item.renames == 1


def test_broadcasts_a_subscriber_does_not_read_are_held_only_up_to_a_bound(broker):
    db, server, _connect = broker
    root = db.root
    checkout(root.things)
    for n in range(server_module.PUSH_OBJECTS):
        root.things[n] = Item("item %d" % n)
    transaction.commit()
    context, sock = unread_socket(server.broadcast_address, zmq.SUB, SUBSCRIBE=b"")
    try:
        time.sleep(0.2)  # the subscription reaches the server
        before = rss_mib()
        body = "y" * (server_module.PUSH_TOTAL // server_module.PUSH_OBJECTS - 512)
        for n in range(400):
            for item in root.things.values():
                checkout(item)
                item.name = "%d %s" % (n, body)
            transaction.commit()
        tid = db.last_tid
        assert wait_until(lambda: server.history.top == tid)
        grown = rss_mib() - before
        assert grown < 60, "%.0f MiB held for a subscriber that reads nothing" % grown
    finally:
        sock.close(0)
        context.term()


def record_commit_threads(server, hold=None):
    """Make `server` note the thread of each commit; `hold(n)`, if given,
    runs in that thread before the n-th (from 0) commit does."""
    threads, commit = [], server._ops["commit"]

    def op_commit(fields):
        if hold is not None:
            hold(len(threads))
        threads.append(threading.current_thread().name)
        return commit(fields)

    server._ops["commit"] = op_commit
    return threads


def test_a_small_commit_runs_in_the_front_thread_and_a_large_one_in_a_worker(broker):
    _db, server, connect = broker
    threads = record_commit_threads(server)
    client = connect()
    client.root.item.name = "small"
    client.commit()
    client.root.item.name = "x" * (INLINE_COMMIT + 1)
    client.commit()
    assert threads[0] == "broker-front"
    assert threads[1].startswith("broker-worker-")
    client.begin()
    assert len(client.root.item.name) == INLINE_COMMIT + 1


def test_commits_go_to_the_workers_while_they_are_slow_and_reads_are_served(broker):
    _db, server, connect = broker
    running, finish = threading.Event(), threading.Event()

    def hold(n):
        if n == 0:
            time.sleep(0.05)  # a slow disk, say: the average rises past the limit
        elif n == 1:
            running.set()
            finish.wait(10)

    threads = record_commit_threads(server, hold)
    writer, reader = connect(), connect(timeout=2, retries=0)
    writer.root.item.name = "slow"
    writer.commit()

    def commit_held():
        writer.root.item.name = "held"
        writer.commit()

    committer = threading.Thread(target=commit_held)
    committer.start()
    try:
        assert running.wait(10)
        # The front thread is free: it answers while the commit is held.
        assert reader.call("hello", "reader") == "hello reader"
        reader.begin()
        assert reader.root.item.name == "slow"
    finally:
        finish.set()
        committer.join(10)
    assert threads[:2] == ["broker-front", threads[1]]
    assert threads[1].startswith("broker-worker-")
    # Quick again: the commits come back to the front thread.
    for n in range(40):
        writer.root.item.name = "quick %d" % n
        writer.commit()
    assert threads[-1] == "broker-front"


def test_a_commit_waiting_for_another_process_lock_leaves_the_front_serving(broker):
    db, server, connect = broker
    threads = record_commit_threads(server)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         "fd = os.open(sys.argv[1], os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n"
         "sys.stdin.readline()\n", db.path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    writer, reader = connect(timeout=20), connect(timeout=2, retries=0)
    committer = None
    try:
        assert holder.stdout.readline().strip() == "held"
        writer.root.item.name = "after the lock"
        committer = threading.Thread(target=writer.commit)
        committer.start()
        deadline = time.monotonic() + 10
        while not threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threads and threads[0].startswith("broker-worker-")
        assert reader.call("hello", "reader") == "hello reader"
        assert reader.root.item.name == "first"
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
        if committer is not None:
            committer.join(30)
    reader.begin()
    assert reader.root.item.name == "after the lock"


def test_resolving_a_request_leaves_it_as_it_came(broker):
    # op_commit resolves a request again when it retries after a store
    # conflict: the request must still name that attempt's new objects.
    _db, server, _connect = broker
    first, second = Item("first"), Item("second")
    request = [Key("n", 1), {"k": Key("n", 1)}, (Key("n", 1),)]
    request.append(request)
    resolved = server._handlers.resolve_values(request, {1: first})
    assert resolved[:3] == [first, {"k": first}, (first,)] and resolved[3] is resolved
    assert request[0] == Key("n", 1) and request[1] == {"k": Key("n", 1)}
    assert server._handlers.resolve_values(request, {1: second})[:2] == [second, {"k": second}]


PLACEHOLDER = "value placeholder"


@pytest.mark.parametrize("value, refusal", [
    (msgpack.packb(msgpack.Timestamp(1)), "cannot be a Timestamp"),
    (b"\x91" * 900 + b"\x01", "nested deeper"),  # once an untyped RecursionError
    (b"\x91" * 61 + b"\x01", "nested deeper"),   # once stored, then never sendable
    (codec.encode(ABSENT), "cannot be ABSENT"),
])
def test_a_value_that_could_not_be_sent_back_is_never_stored(peer, broker, value, refusal):
    db, _server, connect = broker
    hello = peer.request({"id": 1, "op": "hello"})["ok"]
    tid = hello["tid"]
    root = peer.request({"id": 2, "op": "load", "key": hello["root"], "tx": tid})["ok"]
    things, item = root["state"]["things"], root["state"]["item"]
    for n, rows in enumerate([{"set": [[item, "name", "first", PLACEHOLDER]]},
                              {"setitem": [[things, "k", ABSENT, PLACEHOLDER]]},
                              {"setitem": [[things, PLACEHOLDER, ABSENT, 1]]}]):
        body = dict({"new": [], "set": [], "del": [], "setitem": [], "delitem": []}, **rows)
        request = codec.encode(dict(body, id=3 + n, op="commit", tx=tid, since=tid,
                                    token=b"v%015d" % n))
        request = request.replace(codec.encode(PLACEHOLDER), value)
        error_type, message = error_of(peer.request(request))
        assert error_type == "ProtocolError" and refusal in message
    transaction.begin()
    assert db.sync() == tid and db.root.item.name == "first" and len(db.root.things) == 0
    client = connect()
    assert client.root.item.name == "first" and dict(client.root.things.items()) == {}


class Status:
    """A static object: not persistent."""

    name = "a static"


def test_a_commit_that_would_make_an_object_unsendable_is_refused(broker):
    # Each commit was within the limits; together they made the root's
    # record too big to send, and no client could reach anything again.
    _db, _server, connect = broker
    client = connect()
    client.root.junk_a = [0] * 600_000
    client.commit()
    client.root.junk_b = [0] * 600_000
    with pytest.raises(exc.ProtocolError, match="would leave .*Folder unsendable: value has "
                                                "more than 1000000 items"):
        client.commit()
    fresh = connect()
    assert fresh.root.title == "root" and len(fresh.root.junk_a) == 600_000


@pytest.mark.parametrize("mapping", ["things", "tree"])
def test_a_commit_that_would_store_an_unsendable_item_is_refused(broker, mapping):
    # Items are not in their mapping's record, which alone was checked:
    # items "a" and "b" went in one message (the list first), and "b"
    # alone, a cycle through a tuple, could never be sent back.
    db, _server, connect = broker
    client = connect()
    loop = []
    pair = (loop,)
    loop.append(pair)
    items = getattr(client.root, mapping)
    items["a"], items["b"] = loop, pair
    with pytest.raises(exc.ProtocolError, match="would store an item of oid .* that cannot "
                                                "be sent: cannot send a cycle through a tuple"):
        client.commit()
    client.begin()
    assert list(getattr(client.root, mapping).items()) == []
    transaction.begin()
    db.sync()
    assert len(getattr(db.root, mapping)) == 0


def _tuple_cycle():
    loop = []
    loop.append((loop,))
    return loop[0]  # the tuple: it alone cannot be sent


@pytest.mark.parametrize("store, refusal", [
    (lambda root: setattr(root, "junk_b", [0] * 600_000),
     "would leave .*Folder unsendable: value has more than 1000000 items"),
    (lambda root: root.things.__setitem__("b", _tuple_cycle()),
     "would store an item of a PersistentDict that cannot be sent: cannot send a cycle"),
    (lambda root: root.tree.__setitem__("b", _tuple_cycle()),
     "would store an item of a Bucket that cannot be sent: cannot send a cycle"),
    (lambda root: setattr(root, "new", Item([0] * 1_100_000)),  # reached through root
     "would leave .*Item unsendable: value has more than 1000000 items"),
], ids=["attribute", "dict-item", "tree-item", "new-object"])
def test_a_call_that_would_store_what_clients_cannot_read_is_refused(broker, store, refusal):
    # Client commits were checked; application methods' writes were not.
    db, server, connect = broker
    client = connect()
    client.root.junk_a = [0] * 600_000
    client.commit()

    def do_store():
        for obj in (db.root, db.root.things):
            checkout(obj)
        store(db.root)
        return "stored"

    server.do_store = do_store
    with pytest.raises(exc.ProtocolError, match=refusal):
        client.call("store")
    client.begin()
    root = client.root
    assert not hasattr(root, "junk_b") and not hasattr(root, "new")
    assert dict(root.things.items()) == {} and dict(root.tree.items()) == {}
    assert client.call("hello", "still serving") == "hello still serving"


@pytest.mark.parametrize("mapping", ["things", "tree"])
def test_an_item_past_the_codec_s_items_is_refused(peer, broker, mapping):
    # Plain values were decoded past the million items the codec encodes,
    # and stored: refused now, when decoded or when checked.
    db, _server, _connect = broker
    hello = peer.request({"id": 1, "op": "hello"})["ok"]
    root = peer.request({"id": 2, "op": "load", "key": hello["root"], "tx": hello["tid"]})["ok"]
    key = root["state"][mapping]
    placeholder = "big value placeholder"
    request = codec.encode({"id": 3, "op": "commit", "tx": hello["tid"], "since": None,
                            "token": b"i" * 16, "new": [], "set": [], "del": [], "delitem": [],
                            "setitem": [[key, "big", ABSENT, placeholder]]})
    request = request.replace(codec.encode(placeholder),
                              msgpack.packb([[0] * 1000 for _ in range(1001)]))
    error_type, message = error_of(peer.request(request))
    assert error_type in ("ProtocolError", "DecodeError") and "1000000 items" in message
    transaction.begin()
    assert db.sync() == hello["tid"] and len(getattr(db.root, mapping)) == 0


def test_a_commit_whose_states_do_not_fit_its_reply_is_answered_done(tmp_path):
    # The reply carried every state written: over max_message it failed to
    # encode after the commit, and the client heard that its commit failed.
    db = make_database(str(tmp_path / "test.dobbin"))
    with served(db, max_message=1024 * 1024) as server:
        client = BrokerClient(server.address, timeout=10)
        states = []
        commit = server._ops["commit"]

        def op_commit(fields):
            reply = commit(fields)
            result = Codec().decode(reply.data) if type(reply) is Record else reply
            states.append(len(result["states"]))
            return reply

        server._ops["commit"] = op_commit
        try:
            client.root.item.name = "n" * 600_000
            client.commit()
            client.root.title = "t" * 600_000
            client.root.item.renames = 1
            tid = client.commit()  # two records of 600 kB: one fits
            assert states == [1, 1]
            assert client.root.item.renames == 1 and len(client.root.title) == 600_000
            assert client.tid == tid
        finally:
            client.close()
            transaction.abort()
    transaction.begin()
    assert db.sync() == tid and db.root.item.renames == 1
    db.close()


def test_a_commit_creating_more_objects_than_its_reply_can_name_is_refused(tmp_path):
    db = make_database(str(tmp_path / "test.dobbin"))
    with served(db, max_message=8192) as server:
        client = BrokerClient(server.address, timeout=10)
        try:
            # (8192 - 1024) // 40 = 179: room for each entry of "created".
            client.root.item.name = [client.new("broker_fixtures.Item") for _ in range(180)]
            with pytest.raises(exc.ProtocolError, match="creates at most 179 objects"):
                client.commit()
            client.root.item.name = [client.new("broker_fixtures.Item") for _ in range(179)]
            tid = client.commit()  # the states are left out
            assert len(client.root.item.name) == 179
        finally:
            client.close()
            transaction.abort()
    transaction.begin()
    assert db.sync() == tid == 2 and len(db.root.item.name) == 179
    db.close()


def test_a_mapping_whose_items_fit_one_by_one_lists_whole(tmp_path):
    # Each commit checks its items alone; a page of them all was too big
    # to send, and the mapping could no longer be listed at all.
    db = make_database(str(tmp_path / "test.dobbin"))
    with served(db, max_message=8192) as server, \
            BrokerClient(server.address, timeout=10) as client:
        things = client.root.things
        for n in range(6):
            things["big%d" % n] = bytes([n]) * 3000
            client.commit()
        assert len(things) == 6 and sorted(things) == ["big%d" % n for n in range(6)]
        assert dict(things.items())["big5"] == bytes([5]) * 3000
    db.close()


def test_a_client_creates_working_mappings_empty_or_filled(tmp_path):
    # Made without any __init__, a new mapping had no structure: filled,
    # its commit failed; empty, it was stored broken for good.
    db = make_database(str(tmp_path / "test.dobbin"))
    server = BrokerServer(db, address="tcp://127.0.0.1:*")
    server.export_class(Folder)
    for cls in (PersistentDict, OOBTree):
        server.export_class(cls, creatable=True)
    with server, BrokerClient(server.address, timeout=10) as client:
        made = {}
        for name in ("dobbin.persistent.PersistentDict", "dobbin.btree.OOBTree"):
            made[name + " empty"], made[name] = client.new(name), client.new(name)
            made[name]["a"] = 1
        client.root.title = made
        client.commit()
    transaction.begin()
    db.sync()
    stored = db.root.title
    assert {name: dict(mapping.items()) for name, mapping in stored.items()} == {
        name: {} if name.endswith("empty") else {"a": 1} for name in made}
    assert [len(mapping) for mapping in stored.values()] == [0, 1, 0, 1]
    db.close()


def test_a_conflict_on_an_item_names_its_objects_by_key_not_by_address(broker):
    db, _server, connect = broker
    client = connect()
    item = client.root.item
    client.root.things[(item, "pair")] = 1
    client.commit()
    transaction.begin()
    checkout(db.root.things)
    db.root.things[(db.root.item, "pair")] = 2
    transaction.commit()
    client.root.things[(item, "pair")] = 3
    with pytest.raises(exc.ConflictError) as caught:
        client.commit()
    assert caught.value.field == repr((item._key, "pair")) and " at 0x" not in str(caught.value)


@pytest.mark.parametrize("mapping, item, named", [
    ("things", Key("n", 1), "<Key new object #1>"),
    ("things", (Key("n", 1), 2), "(<Key new object #1>, 2)"),
    ("things", frozenset({Key("n", 1)}), "frozenset({<Key new object #1>})"),
    ("tree", (Key("n", 1), 2), "(<Key new object #1>, 2)"),  # (an object alone is no key)
])
def test_a_conflict_on_an_item_names_new_objects_by_their_number(peer, broker, mapping, item,
                                                                 named):
    # They have no key yet: their repr went out, with a server address.
    hello = peer.request({"id": 1, "op": "hello"})["ok"]
    root = peer.request({"id": 2, "op": "load", "key": hello["root"], "tx": hello["tid"]})["ok"]
    reply = peer.request({"id": 3, "op": "commit", "tx": hello["tid"], "since": None,
                          "token": b"n" * 16, "set": [], "del": [], "delitem": [],
                          "new": [[1, "broker_fixtures.Item", {"name": "a"}]],
                          "setitem": [[root["state"][mapping], item, "wrong", 1]]})
    error_type, message = error_of(reply)
    assert error_type == "ConflictError" and reply["error"]["info"]["field"] == named
    assert " at 0x" not in message


def test_a_static_object_can_be_passed_but_not_stored(broker):
    db, server, connect = broker
    server.add_static(Status(), "status")
    client = connect()
    status = client.static("status")
    client.root.item.name = status
    with pytest.raises(exc.ProtocolError, match="static object .* cannot be stored"):
        client.commit()
    client.root.things["status"] = [status]
    with pytest.raises(exc.ProtocolError, match="static object .* cannot be stored"):
        client.commit()
    transaction.begin()
    assert db.sync() == client.begin() and db.root.item.name == "first"
    assert client.call("hello", status.name) == "hello a static"


@pytest.mark.parametrize("mapping, op, items, refusal", [
    ("things", "setitem", [[1, 2]], "unhashable"),
    ("things", "delitem", [[1, 2]], "unhashable"),
    ("tree", "setitem", ["a", 1], "not supported between"),  # B-tree keys must be ordered
])
def test_an_item_that_cannot_be_a_key_is_a_protocol_error(peer, broker, mapping, op, items,
                                                          refusal):
    db, _server, _connect = broker
    hello = peer.request({"id": 1, "op": "hello"})["ok"]
    tid = hello["tid"]
    root = peer.request({"id": 2, "op": "load", "key": hello["root"], "tx": tid})["ok"]
    key = root["state"][mapping]
    rows = [[key, item, ABSENT, n] if op == "setitem" else [key, item, ABSENT]
            for n, item in enumerate(items)]
    body = dict({"new": [], "set": [], "del": [], "setitem": [], "delitem": []}, **{op: rows})
    error_type, message = error_of(peer.request(dict(
        body, id=3, op="commit", tx=tid, since=tid, token=os.urandom(16))))
    assert error_type == "ProtocolError" and refusal in message
    transaction.begin()
    assert db.sync() == tid and len(db.root.tree) == len(db.root.things) == 0


def test_a_commit_retried_after_a_store_conflict_stores_its_own_new_objects(
        broker, monkeypatch):
    db, server, connect = broker
    handlers = server._handlers
    apply_commit = handlers.apply_commit
    attempts = []

    def apply_then_race(f):
        touched = apply_commit(f)
        attempts.append(1)
        if len(attempts) == 1:  # another writer gets in before our commit
            def writer():
                transaction.begin()
                checkout(db.root.things)
                db.root.things["other"] = 1
                transaction.commit()
            thread = threading.Thread(target=writer)
            thread.start()
            thread.join()
        return touched

    monkeypatch.setattr(handlers, "apply_commit", apply_then_race)
    client = connect()
    fresh = client.new("broker_fixtures.Item", name="fresh")
    client.root.things["list"] = [fresh]
    client.root.things["direct"] = fresh
    client.commit()
    assert len(attempts) == 2
    transaction.begin()
    db.sync()
    things = db.root.things
    assert things["list"][0] is things["direct"] and things["direct"].name == "fresh"


def test_a_field_with_a_class_default_can_be_set(broker):
    # Clients see no value (the state has none); the server once compared
    # with the class default instead, and refused every such commit.
    _db, _server, connect = broker
    client = connect()
    client.root.things["x"] = client.new("broker_fixtures.Item")
    client.commit()
    client.begin()
    item = client.root.things["x"]
    with pytest.raises(AttributeError):
        item.name
    item.name = "named"
    client.commit()
    client.begin()
    assert client.root.things["x"].name == "named"


def refused_sets(peer, names, old):
    """The (error type, message) of a commit setting each of `names` of the
    root's item, `old` given as its value now."""
    item, tid = item_key(peer)
    return [error_of(peer.request({
        "id": 10 + n, "op": "commit", "tx": tid, "since": tid, "token": b"s%015d" % n,
        "new": [], "del": [], "setitem": [], "delitem": [], "set": [[item, name, old, "x"]]}))
        for n, name in enumerate(names)]


def test_a_refused_change_tells_a_hidden_field_from_an_absent_one_no_more_than_a_read(
        peer, broker):
    replies = refused_sets(peer, ["secret", "secrat"], "a wrong guess")
    assert [error_type for error_type, _message in replies] == ["ConflictError"] * 2


def test_a_refused_write_tells_an_unexported_method_from_a_hidden_field_no_more(
        peer, broker):
    # "Item.internal of ... is read-only" confirmed a method clients may not see.
    (hidden_type, hidden), (method_type, method) = refused_sets(
        peer, ["secret", "internal"], ABSENT)
    assert hidden_type == method_type == "AccessDenied" and hidden == method
    assert "secret" not in hidden and "internal" not in method


def test_with_fields_declared_a_hidden_name_is_refused_as_an_undeclared_one(broker):
    # Without them a client may add any public field: a refusal then tells
    # a hidden name (docs/broker_guide.txt says so); with them it does not.
    _db, server, _connect = broker
    server.stop()
    server.export_class(Item, fields=["name"], hidden="secret", creatable=True)
    server.start()
    peer = RawPeer(server.address)
    try:
        (hidden_type, hidden), (other_type, other) = refused_sets(
            peer, ["secret", "undeclared"], ABSENT)
    finally:
        peer.close()
    assert hidden_type == other_type == "AccessDenied"
    assert hidden == other and "secret" not in hidden


def test_an_item_of_a_persistent_dict_is_read_without_copying_the_dict(broker, monkeypatch):
    # Each item read deep-copied the whole mapping (db.load_state): a large
    # value stored in it made every client's reads of it slow.
    db, _server, connect = broker
    checkout(db.root.things)
    db.root.things.update(small="value", large=list(range(100000)))
    transaction.commit()
    client = connect()
    things = client.root.things
    copies = []
    load_state = db.load_state
    monkeypatch.setattr(db, "load_state", lambda *args: copies.append(args) or load_state(*args))
    assert things["small"] == "value" and "missing" not in things
    assert copies == []
    # As of an older snapshot, the dict's version then is read all the same.
    checkout(db.root.things)
    db.root.things["small"] = "changed"
    transaction.commit()
    assert things["large"][-1] == 99999 and copies
    client.begin()
    assert client.root.things["small"] == "changed"


def test_clients_cannot_store_values_over_methods(broker):
    db, _server, connect = broker
    client = connect()
    client.root.things["x"] = client.new("broker_fixtures.Item", name="x",
                                         internal="client data")
    with pytest.raises(exc.AccessDenied, match="no such attribute"):
        client.commit()
    transaction.begin()
    db.sync()
    assert "x" not in db.root.things and db.root.item.internal() == "not exported"


def test_a_page_of_items_from_far_past_the_end_is_empty(peer, broker):
    things, tid = things_key(peer)
    for start, limit in [(2 ** 63 - 1, None), (2 ** 63 - 1, 100_000), (1000, 5)]:
        reply = peer.request({"id": 3, "op": "items", "key": things, "tx": tid,
                              "start": start, "limit": limit})
        assert reply["ok"]["items"] == [] and reply["ok"]["more"] is False


def test_reading_a_mapping_before_it_existed_is_a_read_conflict(peer, broker):
    things, _tid = things_key(peer)
    for n, op in enumerate([{"op": "item", "item": "n"}, {"op": "load"}]):
        reply = peer.request(dict(op, id=3 + n, key=things, tx=0))
        assert error_of(reply)[0] == "ReadConflictError"


def test_unknown_call_and_server_errors_are_typed(broker):
    _db, _server, connect = broker
    client = connect()
    with pytest.raises(AttributeError, match="no method 'nothing'"):
        client.call("nothing")
    with pytest.raises(exc.RemoteError) as info:
        client.call("fail")
    assert info.value.type_name == "ValueError" and info.value.remote_traceback is None
    assert client.call("hello", "you") == "hello you"


def test_debug_server_sends_tracebacks(tmp_path):
    db = make_database(str(tmp_path / "d.dobbin"))
    with served(db, debug=True) as server:
        with BrokerClient(server.address, timeout=TIMEOUT) as client:
            with pytest.raises(exc.RemoteError) as info:
                client.call("fail")
            assert "Traceback" in info.value.remote_traceback
    db.close()


def test_oversize_message_drops_only_that_peer(tmp_path):
    db = make_database(str(tmp_path / "d.dobbin"))
    with served(db, max_message=2048) as server:
        hostile = RawPeer(server.address)
        hostile.send(b"", protocol.MAGIC, b"x" * 100000)
        assert hostile.reply(timeout=0.3) is None
        hostile.close()
        with BrokerClient(server.address, timeout=TIMEOUT) as client:
            assert client.root.title == "root"
    db.close()


def test_hidden_field_is_absent_from_every_message(broker):
    db, server, connect = broker
    frames = []  # everything the server sent: replies and broadcasts

    def capture(direction, fs):
        if direction != "send":
            frames.extend(bytes(f) for f in fs)

    client = connect(trace=capture)
    item = client.root.item
    assert item.name == "first"
    with pytest.raises(AttributeError):
        item.secret
    assert item.shout() == "FIRST!"
    assert client.find(client.root.things) == []
    assert client.find("broker_fixtures.Item", secret="hidden-value-1234") == []
    with pytest.raises(exc.AccessDenied, match="no such attribute"):
        item.secret = "overwrite"
        client.commit()
    item.name = "renamed"
    client.commit()
    # A server-side change of the hidden field is broadcast without its value:
    # the broadcast carries the item's new readable state, sealed.
    transaction.begin()
    tid = server.obj_update(db.root.item, secret="hidden-value-1234", name="again")
    assert client.wait_for_broadcast(tid, timeout=2) == tid
    client.begin()
    assert client.root.item.name == "again"
    everything = b"".join(frames)
    assert any(b"inv" == f for f in frames)
    record = unsealed_record(server, frames, tid, client.root.item._key)
    assert record["state"] == {"name": "again"}
    assert b"hidden-value-1234" not in everything
    assert b"secret" not in everything


def broadcasts_in(frames):
    """The decoded broadcasts among captured frames ([b"inv", body] pairs)."""
    found = []
    for topic, body in zip(frames, frames[1:]):
        if topic == protocol.TOPIC:
            try:
                found.append(protocol.check_broadcast(codec.decode(body)))
            except exc.BrokerError:
                pass
    return found


def unsealed_record(server, frames, tid, key):
    """The state record for `key` in the captured broadcast of `tid`, unsealed with its MAC."""
    message, = [b for b in broadcasts_in(frames) if b["tid"] == tid]
    sealed, = [data for oid, data in message["states"] if oid == key.ident]
    return codec.decode(unseal(key.mac, server.instance, tid, sealed))


def test_a_class_search_finds_no_object_kept_in_a_hidden_or_private_field(broker):
    db, _server, connect = broker
    root = db.root
    checkout(root)
    checkout(root.item)
    root.item.secret = Item("payroll record")
    root._admin = Item("admin only")
    checkout(root.things)  # a mapping: its items are searched
    root.things["visible"] = Item("visible")
    transaction.commit()
    client = connect()
    found = client.find("broker_fixtures.Item")
    assert sorted(item.name for item in found) == ["first", "visible"]
    assert client.count("broker_fixtures.Item", name="payroll record") == 0
    assert client.count("broker_fixtures.Item", name="admin only") == 0


def test_a_mapping_search_counts_an_object_under_two_keys_once(broker):
    # get() said 2 objects matched, count() said 2, find() gave it twice;
    # a class search for the same query said 1.
    db, _server, connect = broker
    checkout(db.root.things)
    emma = Item("Emma")
    db.root.things["emma"] = db.root.things["emma-alias"] = emma
    transaction.commit()
    client = connect()
    things = client.root.things
    assert client.get(things, name="Emma") is things["emma"]
    assert client.count(things, name="Emma") == 1 == len(client.find(things, name="Emma"))


def test_hidden_items_of_a_mapping_never_leave_the_server(broker):
    db, _server, connect = broker
    root = db.root
    checkout(root.things)
    root.things["alice"] = Profile(login="alice", password="hunter2",
                                   account=Item("secret account"))
    transaction.commit()
    frames = []
    client = connect(trace=lambda direction, fs: frames.extend(bytes(f) for f in fs))
    remote = client.root.things["alice"]
    assert dict(remote.items()) == {"login": "alice", "account": remote["account"]}
    assert "password" not in remote and len(list(remote.keys())) == 2
    with pytest.raises(KeyError):
        remote["password"]
    assert client.find(remote, login="alice") == []  # values, not the mapping itself
    assert not any(b"hunter2" in frame for frame in frames)


def test_hidden_items_of_a_mapping_can_be_neither_guessed_nor_changed(broker):
    # A commit's old value was checked against the hidden item: a wrong
    # guess conflicted and the right one overwrote the password.
    db, _server, connect = broker
    root = db.root
    checkout(root.things)
    root.things["alice"] = Profile(login="alice", password="hunter2")
    transaction.commit()
    client = connect()
    remote = client.root.things["alice"]
    remote["password"] = "pwned"  # as the client sees it: a new item
    with pytest.raises(exc.AccessDenied, match="cannot be set"):
        client.commit()
    for guess in ["letmein", "hunter2"]:
        client._changes.set_item(remote, "password", "pwned", guess)  # what a raw peer may send
        with pytest.raises(exc.ConflictError):
            client.commit()
    del remote["login"]
    client._changes.set_item(remote, "password", DELETED, ABSENT)  # absent to clients: no-op
    client.commit()
    transaction.begin()
    db.sync()
    assert dict(db.root.things["alice"]) == {"password": "hunter2"}


def test_an_object_as_a_tree_item_is_refused_without_its_repr(broker):
    # The refusal once passed on the TypeError's text, which shows the
    # object's repr: its address, or a custom repr's hidden fields.
    _db, _server, connect = broker
    client = connect()
    tree, item = client.root.tree, client.root.item

    def set_item():
        tree[item] = 1
        client.commit()
    for attempt in (lambda: tree.get(item), set_item):
        with pytest.raises(exc.ProtocolError, match="type Item is unhashable, or not ordered") \
                as info:
            attempt()
        assert "0x" not in str(info.value) and "object at" not in str(info.value)


def test_broadcast_states_are_sealed_for_key_holders(broker):
    db, server, connect = broker
    frames = []
    watcher = connect(trace=lambda direction, fs: frames.extend(bytes(f) for f in fs))
    writer = connect()
    writer.root.item.name = "sealed"
    tid = writer.commit()
    assert watcher.wait_for_broadcast(tid, timeout=2) == tid
    message, = [b for b in broadcasts_in(frames) if b["tid"] == tid]
    key = writer.root.item._key
    assert message["oids"] == [key.ident] and len(message["states"]) == 1
    assert b"sealed" not in b"".join(frames)
    record = unsealed_record(server, frames, tid, key)
    assert record == {"class": "broker_fixtures.Item", "serial": tid,
                      "state": {"name": "sealed"}}
    # Without the key (here: another object's MAC) the bytes are noise.
    wrong = writer.root._key.mac
    with pytest.raises(exc.BrokerError):
        protocol.check_result("load", codec.decode(
            unseal(wrong, server.instance, tid, message["states"][0][1])))


def test_big_transactions_are_broadcast_without_states(broker):
    db, server, connect = broker
    client = connect()
    transaction.begin()
    things = db.root.things
    checkout(things)
    for n in range(PUSH_OBJECTS + 1):
        things["n%d" % n] = server.obj_new(Item, name="many %d" % n)
    transaction.commit()
    tid = db.committed_tid
    frames = []
    client._conn.trace = lambda direction, fs: frames.extend(bytes(f) for f in fs)
    assert client.wait_for_broadcast(tid, timeout=2) == tid
    message, = [b for b in broadcasts_in(frames) if b["tid"] == tid]
    assert len(message["oids"]) > PUSH_OBJECTS and message["states"] == []


def test_sync_answers_the_newest_tid_whose_subscribers_ran(broker):
    db, server, _connect = broker
    # db.sync() may report a commit that is not durable yet and not broadcast:
    # a snapshot there would miss its invalidations.
    top = server.history.top
    real_sync = db.sync
    db.sync = lambda: real_sync() + 5
    try:
        assert server.sync_database() == top
    finally:
        del db.sync


def test_statics(broker):
    _db, server, connect = broker

    class Status:
        health = "OK"

        def __init__(self):
            self.load = 0.5

    status = Status()
    server.add_static(status, "status", 1)
    client = connect()
    proxy = client.static("status", 1)
    assert proxy.load == 0.5 and client.static("status", 1) is proxy
    assert server.key_for(status) == proxy._key
    server.obj_update(status, load=2.5)
    assert proxy.load == 0.5  # not inside a running transaction
    client.wait_for_broadcast(timeout=1)
    client.abort()
    assert proxy.load == 2.5
    with pytest.raises(KeyError):
        client.static("nothing")
    server.del_static("status", 1)
    with pytest.raises(KeyError):
        client.static("status", 1)


def test_the_same_server_object_started_again_is_a_new_server_to_its_clients(tmp_path):
    # It kept its instance number: clients went on listening at the old
    # broadcast port and kept a static changed after the restart stale.
    db = make_database(str(tmp_path / "d.dobbin"))

    class Settings:
        colour = "red"

    settings = Settings()
    server = configure(TestServer(db, address="ipc://%s" % (tmp_path / "broker"),
                                  broadcast="tcp://127.0.0.1:*"))
    server.add_static(settings, "settings")
    server.start()
    try:
        first, first_broadcasts = server.instance, server.broadcast_address
        with BrokerClient(server.address, timeout=TIMEOUT) as client:
            proxy = client.static("settings")
            assert proxy.colour == "red"
            server.stop()
            server.start()
            assert server.instance != first and server.broadcast_address != first_broadcasts
            client.begin()  # learns of the new server, and where it broadcasts
            server.obj_update(settings, colour="blue")

            def seen_blue():
                client.wait_for_broadcast(timeout=0.1)
                client.begin()
                return proxy.colour == "blue"

            assert wait_until(seen_blue)
    finally:
        server.stop()
        db.close()


def test_a_server_starts_and_serves_over_damaged_commit_metadata(tmp_path, caplog):
    path = str(tmp_path / "d.dobbin")
    make_database(path).close()
    append_record(path, COMMITTED, [MetaEntry(b"\xff not json")])  # sound checksums
    db = Database(path, durability="none")
    with served(db) as server:
        with BrokerClient(server.address, timeout=TIMEOUT) as client:
            client.root.item.name = "still served"
            client.commit()
    db.close()
    assert any("could not read the latest commits" in r.getMessage() for r in caplog.records)


def test_static_keys_survive_restart_and_other_servers(tmp_path):
    db = make_database(str(tmp_path / "d.dobbin"))
    with served(db) as first:
        first.add_static(object(), "x")
        key = first.keyring.sign("s", ("x",))
        root_key = first.key_for(db.root)
    with served(db) as second:
        assert second.keyring.verify(key) == ("x",)
        assert second.key_for(db.root) == root_key
    db.close()


def test_two_servers_on_one_file(tmp_path):
    path = str(tmp_path / "d.dobbin")
    db1 = make_database(path)
    db2 = Database(path, durability="none")
    with served(db1) as s1, served(db2) as s2:
        with BrokerClient(s1.address, timeout=TIMEOUT) as c1, \
                BrokerClient(s2.address, timeout=TIMEOUT) as c2:
            c1.root.item.name = "via one"
            tid = c1.commit()
            assert c2.wait_for_broadcast(tid, timeout=2) == tid  # noticed by s2's poller
            c2.begin()
            assert c2.root.item.name == "via one"
            c2.root.item.name = "via two"
            c2.commit()
            c1.begin()
            assert c1.root.item.name == "via two"
    db1.close()
    db2.close()


def test_stop_leaves_no_threads_and_is_idempotent(tmp_path):
    before = set(threading.enumerate())
    db = make_database(str(tmp_path / "d.dobbin"))
    with served(db) as server:
        with BrokerClient(server.address, timeout=TIMEOUT) as client:
            client.root.title
    server.stop()
    assert set(threading.enumerate()) <= before
    db.close()


@pytest.mark.parametrize("workers", [1, 3])
def test_runs_the_requested_number_of_workers(tmp_path, workers):
    db = make_database(str(tmp_path / "d.dobbin"))
    with served(db, workers=workers):
        names = [thread.name for thread in threading.enumerate()]
        assert sorted(n for n in names if n.startswith("broker-worker-")) == [
            "broker-worker-%d" % n for n in range(workers)]
    db.close()


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2", None])
def test_rejects_a_bad_number_of_workers(tmp_path, workers):
    db = make_database(str(tmp_path / "d.dobbin"))
    with pytest.raises(exc.ExportError, match="workers"):
        served(db, workers=workers).__enter__()
    db.close()


def test_stop_waits_for_a_request_still_running_and_returns(tmp_path):
    from broker.server import BrokerServer
    started, finish = threading.Event(), threading.Event()

    class SlowServer(BrokerServer):
        def do_slow(self):
            started.set()
            finish.wait(10)
            return "done"

    before = set(threading.enumerate())
    db = make_database(str(tmp_path / "d.dobbin"))
    server = SlowServer(db, address="tcp://127.0.0.1:*").start()
    with BrokerClient(server.address, timeout=0.2, retries=0) as client:
        with pytest.raises(exc.BrokerTimeout):
            client.call("slow")
    assert started.wait(10)
    stopper = threading.Thread(target=server.stop, daemon=True)
    stopper.start()
    time.sleep(0.2)
    finish.set()  # the worker replies after the stop began, to a client gone
    stopper.join(10)
    assert not stopper.is_alive(), "stop() hung on the worker's reply"
    assert set(threading.enumerate()) <= before
    db.close()


def test_a_request_that_comes_while_stopping_never_runs_later(tmp_path):
    from broker.server import BrokerServer
    started, finish, ran = threading.Event(), threading.Event(), []

    class SlowServer(BrokerServer):
        def do_slow(self):
            started.set()
            finish.wait(10)

        def do_effect(self, tag):
            ran.append(tag)

    db = make_database(str(tmp_path / "d.dobbin"))
    server = SlowServer(db, address="tcp://127.0.0.1:*", workers=1).start()
    busy = BrokerClient(server.address, timeout=0.2, retries=0)
    late = BrokerClient(server.address, timeout=0.2, retries=0)
    threading.Thread(target=lambda: pytest.raises(exc.BrokerTimeout, busy.call, "slow"),
                     daemon=True).start()
    assert started.wait(10)
    stopper = threading.Thread(target=server.stop, daemon=True)
    stopper.start()
    time.sleep(0.1)  # stop() waits for the busy worker; the front thread still reads
    with pytest.raises(exc.BrokerTimeout):
        late.call("effect", "sent while stopping")
    finish.set()
    stopper.join(10)
    server.start()  # the same object, serving again
    with BrokerClient(server.address, timeout=TIMEOUT) as client:
        client.call("effect", "after the restart")
    server.stop()
    busy.close()
    late.close()
    db.close()
    assert ran == ["after the restart"]


def test_bind_failure_leaves_nothing_running(tmp_path):
    db = make_database(str(tmp_path / "d.dobbin"))
    before = set(threading.enumerate())
    with served(db) as server:
        with pytest.raises(exc.AddressError, match="Address already in use"):
            served(db, address=server.address).__enter__()
    assert set(threading.enumerate()) <= before
    db.close()


@pytest.mark.parametrize("options, message", [
    ({"address": "not-an-endpoint"}, "cannot derive a broadcast endpoint"),
    ({"address": 5}, "an address is a str"),
    ({"address": "tcp://127.0.0.1:*", "broadcast": "bogus://x"}, "cannot bind 'bogus://x'"),
    ({"address": "tcp://127.0.0.1:port"}, "cannot bind"),
])
def test_an_address_that_cannot_be_bound_is_an_address_error(tmp_path, options, message):
    db = make_database(str(tmp_path / "d.dobbin"))
    before = set(threading.enumerate())
    with pytest.raises(exc.AddressError, match=message):
        BrokerServer(db, **options).start()
    assert set(threading.enumerate()) <= before
    db.close()


def test_server_side_new_and_delete(broker):
    db, server, connect = broker
    client = connect()
    assert client.root.things.keys() == []
    transaction.begin()
    things = db.root.things
    checkout(things)
    things["made"] = server.obj_new(Item, name="server-made")
    transaction.commit()
    client.begin()
    assert client.root.things["made"].name == "server-made"
    transaction.begin()
    server.obj_delete(db.root.things, "made")
    client.begin()
    assert "made" not in client.root.things


def test_curve_server_answers_worker_requests(tmp_path):
    # Worker replies reach the front thread through the ROUTER's inproc
    # endpoint, which must work alongside CURVE on the public one.
    db = make_database(str(tmp_path / "d.dobbin"))
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    with served(db, curve_secret_key=server_secret, curve_allow=[client_public]) as server:
        curve = (server_public, client_public, client_secret)
        with BrokerClient(server.address, timeout=TIMEOUT, curve=curve) as client:
            client.root.item.name = "curved"
            assert client.commit() == db.last_tid
            assert client.call("hello", "you") == "hello you"
    db.close()


def test_curve_allow_list_takes_binary_keys_as_well_as_z85(tmp_path):
    # ZeroMQ asks the allow-list in Z85: a binary key listed let nobody in.
    db = make_database(str(tmp_path / "d.dobbin"))
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    allowed = [zmq.utils.z85.decode(client_public)]
    with served(db, curve_secret_key=zmq.utils.z85.decode(server_secret),
                curve_allow=allowed) as server:
        curve = (server_public, client_public, client_secret)
        with BrokerClient(server.address, timeout=TIMEOUT, curve=curve) as client:
            assert client.root.item.name == db.root.item.name
    db.close()


def test_curve_allow_without_a_server_key_refuses_to_start(tmp_path):
    # It started in plain text and served any client.
    db = make_database(str(tmp_path / "d.dobbin"))
    client_public, _client_secret = zmq.curve_keypair()
    server = TestServer(db, address="tcp://127.0.0.1:*", curve_allow=[client_public])
    with pytest.raises(exc.CurveKeyError, match="needs curve_secret_key"):
        server.start()
    assert server.address is None or not server._running
    db.close()


def test_a_malformed_server_key_fails_start_at_once(tmp_path):
    # start() hung for ever: the half-made socket held the context open.
    db = make_database(str(tmp_path / "d.dobbin"))
    server = TestServer(db, address="tcp://127.0.0.1:*", curve_secret_key=b"short")
    outcome = []
    starting = threading.Thread(target=lambda: outcome.append(_start_error(server)),
                                daemon=True)
    starting.start()
    starting.join(10)
    assert not starting.is_alive(), "start() hung"
    assert isinstance(outcome[0], exc.CurveKeyError)
    assert not [t for t in threading.enumerate() if "auth" in t.name.lower() and t.is_alive()
                and t is not threading.current_thread()]
    db.close()


def _start_error(server):
    try:
        server.start()
    except exc.BrokerError as error:
        return error
    server.stop()
    return None


def rename_call(token):
    """A raw call request of the fixtures' counted write, Item.rename."""
    return {"id": 1, "op": "call", "name": "rename", "args": ["once"], "kwargs": {},
            "token": token}


def request_served(db, request):
    """Serve `db` for one raw `request`; return its reply."""
    with served(db) as server:
        peer = RawPeer(server.address)
        try:
            return peer.request(request)
        finally:
            peer.close()


def test_a_recalled_write_refused_as_busy_still_never_runs_again(tmp_path):
    # The refusal took the recalled record with it: the next copy ran again.
    path = str(tmp_path / "d.dobbin")
    db = make_database(path)
    call = rename_call(b"b" * 16)
    assert request_served(db, call)["ok"] == "once"
    with served(db) as server:
        peer = RawPeer(server.address)
        try:
            with server._queued_lock:
                server._queued_bytes = server_module.MAX_QUEUED_BYTES  # as if full
            assert error_of(peer.request(call))[0] == "Busy"
            with server._queued_lock:
                server._queued_bytes = 0
            assert error_of(peer.request(call))[0] == "ResultLost"  # ran: not again
        finally:
            peer.close()
    transaction.begin()
    db.sync()
    assert db.root.item.renames == 1
    db.close()


def test_a_restart_recalls_the_commits_after_damage_further_back(tmp_path, caplog):
    # One damaged old record made the recall raise and recall nothing: a
    # resent write then ran a second time.
    path = str(tmp_path / "d.dobbin")
    db = make_database(path)
    checkout(db.root)
    db.root.name = "early"
    transaction.commit()
    early_end = db._log.end
    while db._log.checkpoint < early_end:  # a checkpoint after it: the open reads past neither
        checkout(db.root)
        db.root.pad = os.urandom(3000).hex()
        transaction.commit()
    call = rename_call(b"k" * 16)
    assert request_served(db, call)["ok"] == "once"
    db.close()
    flip_bit(path, early_end - 40)
    db = Database(path, durability="none")
    try:
        assert error_of(request_served(db, call))[0] == "ResultLost"  # ran: not again
        transaction.begin()
        db.sync()
        assert db.root.item.renames == 1
    finally:
        db.close()
    assert any("stopped at damage" in r.getMessage() for r in caplog.records)


# -- reads as of the snapshot, writes checked on what they change -------------------


def commit_during(start_thread, change):
    """A hook that, on its first call only, has another thread run `change()`
    and commit, and waits for it: a commit landing at that point of the
    server's work."""
    landed = []

    def land():
        if not landed:
            landed.append(True)

            def run():
                transaction.begin()
                change()
                transaction.commit()

            start_thread(run).join()

    return land


@pytest.mark.parametrize("mapping", ["things", "tree"])
def test_a_commit_landing_between_an_item_check_and_its_write_makes_the_write_conflict(
        broker, start_thread, monkeypatch, mapping):
    # The old value was checked on the live mapping, checked out (or, for a
    # B-tree, its bucket) only afterwards: a commit landing in between was
    # the base of the checkout, and overwritten unseen.
    db, server, connect = broker

    def set_k(value):
        items = getattr(db.root, mapping)
        if mapping == "things":
            checkout(items)
        items["k"] = value

    transaction.begin()
    set_k("v0")
    transaction.commit()
    client = connect()
    remote = getattr(client.root, mapping)
    assert remote["k"] == "v0"
    remote["k"] = "mine"
    land = commit_during(start_thread, lambda: set_k("theirs"))
    verify = server._handlers._verify

    def verify_then_land(*args):
        verify(*args)
        land()

    monkeypatch.setattr(server._handlers, "_verify", verify_then_land)
    with pytest.raises(exc.ConflictError):
        client.commit()
    transaction.begin()
    db.sync()
    assert getattr(db.root, mapping)["k"] == "theirs"


def test_a_commit_landing_while_a_b_tree_is_read_does_not_show_in_the_reply(
        broker, start_thread, monkeypatch):
    # Its nodes' serials were checked first, and the live tree read after: a
    # commit landing in between showed in a search or listing of the snapshot.
    db, server, connect = broker
    transaction.begin()
    filler = Item("filler")
    db.root.tree.update(("k%03d" % n, filler) for n in range(300))  # several buckets
    transaction.commit()
    client = connect()
    remote = client.root.tree
    handlers, checked = server._handlers, server._handlers.mapping_at

    def mapping_at(*args):
        result = checked(*args)
        land()
        return result

    def to_first():
        db.root.tree["k250"] = db.root.item  # named "first", in a later bucket

    land = commit_during(start_thread, to_first)
    monkeypatch.setattr(handlers, "mapping_at", mapping_at)
    assert client.count(remote, name="first") == 0
    monkeypatch.undo()
    # Between the reading and the check of what was read (which first waits
    # for the publication of commits landing meanwhile).
    land = commit_during(start_thread, lambda: db.root.tree.pop("k100"))
    real_await = db.await_publication

    def await_publication():
        land()
        return real_await()

    monkeypatch.setattr(db, "await_publication", await_publication)
    items = dict(remote.items())
    monkeypatch.undo()
    transaction.begin()
    assert "k100" not in db.root.tree  # it landed
    assert len(items) == 300 and items["k100"] is items["k250"] is remote["k000"]
    client.begin()
    assert client.count(remote, name="first") == 1 and "k100" not in remote


def test_a_b_tree_changed_after_the_snapshot_is_read_as_it_was(broker):
    # A read conflict whenever a node read had changed after the snapshot,
    # though the log keeps the version as of the snapshot of each one.
    db, _server, connect = broker
    transaction.begin()
    db.root.tree.update(("k%04d" % n, n) for n in range(200))
    transaction.commit()
    client = connect()
    remote = client.root.tree
    transaction.begin()
    tree = db.root.tree
    tree.update(("k%04d" % n, -n) for n in range(3000))  # every bucket changed, and split
    for n in range(0, 200, 2):
        del tree["k%04d" % n]
    transaction.commit()
    assert remote["k0004"] == 4 and "k0500" not in remote and remote.get("k0199") == 199
    assert len(remote) == 200 and sorted(remote) == ["k%04d" % n for n in range(200)]
    assert dict(remote.items()) == {"k%04d" % n: n for n in range(200)}
    client.begin()
    assert remote["k0005"] == -5 and "k0004" not in remote and len(remote) == 2900


def test_reading_a_b_tree_before_it_existed_is_a_read_conflict(peer, broker):
    hello = peer.request({"id": 1, "op": "hello"})["ok"]
    root = peer.request({"id": 2, "op": "load", "key": hello["root"], "tx": hello["tid"]})["ok"]
    tree = root["state"]["tree"]
    for n, op in enumerate([{"op": "item", "key": tree, "item": "n"},
                            {"op": "items", "key": tree, "start": 0, "limit": None},
                            {"op": "search", "target": tree, "mode": "count", "query": {},
                             "limit": None}]):
        reply = peer.request(dict(op, id=3 + n, tx=0))
        assert error_of(reply)[0] == "ReadConflictError"


def test_a_class_search_walks_the_object_graph_as_of_the_snapshot(broker):
    # It walked the live graph: objects removed after the snapshot were not
    # found, and the result disagreed with the mappings read in the same
    # transaction.
    db, _server, connect = broker
    transaction.begin()
    checkout(db.root.things)
    db.root.things["gone"] = Item("gone")
    db.root.tree["also gone"] = Item("in a tree")
    transaction.commit()
    reader, writer = connect(), connect()
    del writer.root.things["gone"]
    del writer.root.tree["also gone"]
    writer.root.things["new"] = writer.new("broker_fixtures.Item", name="new")
    writer.commit()
    found = reader.find("broker_fixtures.Item")
    assert sorted(item.name for item in found) == ["first", "gone", "in a tree"]
    assert reader.get("broker_fixtures.Item", name="gone").name == "gone"
    assert reader.count("broker_fixtures.Item", name="new") == 0
    reader.begin()
    assert sorted(item.name for item in reader.find("broker_fixtures.Item")) == ["first", "new"]


def test_a_client_that_missed_the_last_broadcasts_learns_it_from_its_sync(broker, monkeypatch):
    # Only a later broadcast's number showed that some were lost: with none
    # coming, a static the lost one named stayed stale in every transaction.
    _db, server, connect = broker

    class Settings:
        colour = "red"

    settings = Settings()
    server.add_static(settings, "settings")
    client = connect()
    remote = client.static("settings")
    assert remote.colour == "red"
    monkeypatch.setattr(client._conn, "broadcasts", lambda timeout=0: [])  # all lost
    server.obj_update(settings, colour="blue")
    client.begin()
    assert remote.colour == "blue"
    monkeypatch.undo()
    # Should the lost one come after all, late, it is no gap to flush for.
    client._invalidations.receive(
        protocol.static_invalidation(server.instance, server.broadcast_seq, [["settings"]]))
    assert not client._invalidations.gap and not client._invalidations.flush_needed
    loads = server.requests["load"]
    client.begin()  # in step again: the static is kept
    assert remote.colour == "blue" and server.requests["load"] == loads



def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for process %d" % pid)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_clients_that_come_and_go_while_nothing_commits_leave_nothing_behind(tmp_path):
    # ZeroMQ frees the session of a subscriber that left only when the
    # broadcast socket is used: with no commit to broadcast, the server kept
    # about 11.5 KB for every client that had connected.
    path = str(tmp_path / "d.dobbin")
    make_database(path).close()
    address = "ipc://%s/broker.sock" % tmp_path
    process = ServerProcess(path, address).start()

    def come_and_go(count):
        for _ in range(count):
            client = BrokerClient(address, timeout=TIMEOUT)
            assert client.root.item.name == "first"
            client.close()
        time.sleep(0.3)  # the server's poller comes round
        return _rss_kib(process.process.pid)

    try:
        before = come_and_go(100)  # warm: caches, pools
        after = come_and_go(400)
    finally:
        assert process.stop() == 0
    assert after - before < 400 * 3, "%d KiB kept for 400 clients gone" % (after - before)


def test_stopping_removes_its_ipc_socket_files(tmp_path):
    # ZeroMQ (the build here) leaves them behind, even on unbind.
    db = make_database(str(tmp_path / "d.dobbin"))
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    with served(db, address="ipc://%s/s.sock" % sockets):
        assert sorted(os.listdir(sockets)) == ["s.sock", "s.sock.lock", "s.sock.pub",
                                               "s.sock.pub.lock"]
    assert os.listdir(sockets) == []
    db.close()


def test_of_two_servers_starting_at_once_on_one_ipc_path_one_serves_it(tmp_path, monkeypatch):
    # Each saw nothing listening, then both bound: the second took the
    # path (and the first one's clients), and stopping either removed the
    # socket file the other still served.  The pause after the check
    # makes the two starts overlap every time.
    check = endpoints._check_ipc_path_free

    def check_slowly(*args):
        check(*args)
        time.sleep(0.2)

    monkeypatch.setattr(endpoints, "_check_ipc_path_free", check_slowly)
    db = make_database(str(tmp_path / "d.dobbin"))
    address = "ipc://%s/s.sock" % tmp_path
    servers = [configure(TestServer(db, address=address)) for _ in range(2)]
    started, refused = [], []

    def start(server):
        try:
            started.append(server.start())
        except exc.AddressError:
            refused.append(server)

    threads = [threading.Thread(target=start, args=(server,)) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert (len(started), len(refused)) == (1, 1)
        refused[0].stop()  # a server that did not start stops nothing of the other's
        client = BrokerClient(address, timeout=TIMEOUT, retries=0)
        assert client.root.item.name == "first"
        client.close()
    finally:
        for server in started:
            server.stop()
        db.close()
    assert [name for name in os.listdir(tmp_path) if name.startswith("s.sock")] == []


def test_a_start_that_fails_removes_the_socket_files_it_made_and_no_others(tmp_path):
    db = make_database(str(tmp_path / "d.dobbin"))
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    with served(db, address="ipc://%s/first.sock" % sockets) as first, served(db) as tcp:
        # Its request endpoint is bound when the broadcast one, taken, fails.
        second = TestServer(db, address="ipc://%s/second.sock" % sockets,
                            broadcast=tcp.broadcast_address)
        with pytest.raises(exc.AddressError, match="Address already in use"):
            second.start()
        ours = ["first.sock", "first.sock.lock", "first.sock.pub", "first.sock.pub.lock"]
        assert sorted(os.listdir(sockets)) == ours
        # A live server's socket is neither taken over nor removed.
        third = TestServer(db, address=first.address)
        with pytest.raises(exc.AddressError, match="Address already in use"):
            third.start()
        assert sorted(os.listdir(sockets)) == ours
        client = BrokerClient(first.address, timeout=TIMEOUT)
        assert client.root.item.name == "first"
        client.close()
    assert os.listdir(sockets) == []
    db.close()
