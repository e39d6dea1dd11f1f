"""broker.transport: lazy pirate retries, stale replies, timeouts."""

import socket
import threading
import time

import pytest
import zmq

from broker import protocol
from broker.codec import Codec
from broker.exc import AddressError, BrokerTimeout, ClientClosed, CurveKeyError, ProtocolError
from broker.transport import (BROADCAST_QUEUE, MAX_SPIN, WAIT_SLICE, Connection, UseLock,
                              reachable_broadcast)
from broker_fixtures import run_python, wait_until

codec = Codec()


class FlakyServer(threading.Thread):
    """A ROUTER on 127.0.0.1 that ignores the first `drop` requests and can send junk."""

    def __init__(self, drop=0, stale_first=False, junk=False):
        super().__init__(daemon=True)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:*")
        self.address = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.drop = drop
        self.stale_first = stale_first
        self.junk = junk
        self.seen = 0
        self.running = True

    def run(self):
        while self.running:
            if not self.socket.poll(50):
                continue
            routing, _empty, _magic, body = self.socket.recv_multipart()
            self.seen += 1
            if self.seen <= self.drop:
                continue
            rid = codec.decode(body)["id"]
            if self.junk:
                self.socket.send_multipart([routing, b"", b"junk"])
                continue
            if self.stale_first:
                self.socket.send_multipart([routing, b"", protocol.MAGIC, codec.encode(
                    protocol.ok_reply(rid + 1000, 7, "stale"))])
            self.socket.send_multipart([routing, b"", protocol.MAGIC, codec.encode(
                protocol.ok_reply(rid, 7, "fresh"))])

    def close(self):
        self.running = False
        self.join()
        self.socket.close(0)
        self.context.term()


@pytest.fixture
def flaky(request):
    servers = []

    def make(**options):
        server = FlakyServer(**options)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def test_a_client_that_takes_no_broadcasts_holds_a_bounded_number(tmp_path):
    # ZeroMQ's default read ahead 1,000 broadcasts of up to 256 KiB each.
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)  # the server's bound aside: ours alone
    pub.setsockopt(zmq.LINGER, 0)
    address = "ipc://%s/pub.sock" % tmp_path
    pub.bind(address)
    connection = Connection("ipc://%s/none.sock" % tmp_path, Codec(), timeout=2)
    try:
        connection.subscribe(address)
        body = bytes(64 * 1024)
        for _ in range(BROADCAST_QUEUE * 10):
            pub.send_multipart([protocol.TOPIC, body], zmq.NOBLOCK)
        time.sleep(0.5)  # ZeroMQ reads ahead meanwhile
        held = 0
        while connection._sub.poll(0):
            connection._sub.recv_multipart()
            held += 1
        assert 0 < held < BROADCAST_QUEUE * 5, held
    finally:
        connection.close()
        pub.close(0)
        context.term()


def test_retry_on_a_fresh_socket_after_a_lost_request(flaky):
    server = flaky(drop=1)
    connection = Connection(server.address, codec, timeout=0.2, retries=2)
    try:
        assert connection.request("ping", {}) == (7, True, "fresh")
        assert connection.reconnects == 1 and server.seen == 2
    finally:
        connection.close()


def test_stale_replies_are_dropped(flaky):
    server = flaky(stale_first=True)
    connection = Connection(server.address, codec, timeout=1, retries=0)
    try:
        assert connection.request("ping", {})[2] == "fresh"
    finally:
        connection.close()


def test_malformed_reply_frames_raise_protocol_error(flaky):
    server = flaky(junk=True)
    connection = Connection(server.address, codec, timeout=1, retries=0)
    try:
        with pytest.raises(ProtocolError):
            connection.request("ping", {})
    finally:
        connection.close()


@pytest.mark.parametrize("spin", [0, MAX_SPIN])
def test_only_quick_requests_busy_wait_for_their_reply(flaky, spin):
    server = flaky()
    connection = Connection(server.address, codec, timeout=1, retries=0, spin=spin)
    waits = []
    await_reply = connection._await
    connection._await = lambda rid, spun=0: waits.append(spun) or await_reply(rid, spun)
    try:
        for op in ("ping", "load", "sync", "commit", "call", "find"):
            assert connection.request(op, {})[2] == "fresh"
        assert waits == [spin, spin] + [0] * 4
    finally:
        connection.close()


def test_timeout_after_every_retry(flaky):
    server = flaky(drop=100)
    connection = Connection(server.address, codec, timeout=0.05, retries=2)
    try:
        with pytest.raises(BrokerTimeout, match="3 attempt"):
            connection.request("ping", {})
    finally:
        connection.close()
    with pytest.raises(ClientClosed):
        connection.request("ping", {})
    connection.close()  # idempotent


def test_a_request_that_timed_out_is_not_delivered_when_a_server_comes_back():
    # The last attempt's socket kept it queued: a commit the caller was
    # told failed was applied once the server restarted.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = "tcp://127.0.0.1:%d" % probe.getsockname()[1]
    connection = Connection(address, codec, timeout=0.05, retries=1)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    try:
        with pytest.raises(BrokerTimeout):
            connection.request("commit", {})  # nobody listens
        router.bind(address)
        assert not router.poll(1000)  # two reconnect intervals: it would be here

        def reply():
            routing, empty, _magic, body = router.recv_multipart()
            router.send_multipart([routing, empty, protocol.MAGIC, codec.encode(
                protocol.ok_reply(codec.decode(body)["id"], 7, "fresh"))])
        replies = threading.Thread(target=reply)
        replies.start()
        assert connection.request("ping", {})[2] == "fresh"  # the next request gets through
        replies.join(10)
    finally:
        connection.close()
        router.close(0)
        context.term()


def test_a_wait_longer_than_a_slice_still_gets_its_reply():
    # Waits go in slices of WAIT_SLICE; a reply after several still counts.
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    address = router.getsockopt(zmq.LAST_ENDPOINT).decode()

    def answer_late():
        routing, _empty, _magic, body = router.recv_multipart()
        time.sleep(3 * WAIT_SLICE)
        router.send_multipart([routing, b"", protocol.MAGIC, codec.encode(
            protocol.ok_reply(codec.decode(body)["id"], 7, "late"))])

    thread = threading.Thread(target=answer_late)
    thread.start()
    connection = Connection(address, codec, timeout=10 * WAIT_SLICE, retries=0)
    try:
        assert connection.request("ping", {}) == (7, True, "late")
    finally:
        thread.join()
        connection.close()
        router.close(0)
        context.term()


def test_closing_ends_a_wait_in_another_thread_with_client_closed(flaky):
    server = flaky(drop=100)
    connection = Connection(server.address, codec, timeout=60, retries=3)
    outcome = []

    def wait():
        try:
            connection.request("ping", {})
        except ClientClosed as error:
            outcome.append(error)

    thread = threading.Thread(target=wait)
    thread.start()
    assert wait_until(lambda: server.seen)
    connection.closing = True
    thread.join(30)  # not 4 x 60 s of retries
    try:
        assert not thread.is_alive()
        assert "unknown" in str(outcome[0]) and server.seen == 1
        with pytest.raises(ClientClosed):
            connection.request("ping", {})
    finally:
        connection.close()


DROPPED_UNCLOSED = """
import gc
from broker.codec import Codec
from broker.transport import Connection
from broker_fixtures import run_python
gc.disable()
for _ in range(3):
    connection = Connection("%s", Codec())
    connection.cycle = connection  # only the cyclic collector can free it
    del connection
gc.collect()
print("collected")
"""


def test_a_connection_dropped_unclosed_is_collected_without_hanging(flaky):
    server = flaky()
    # Left to the collector alone, pyzmq ended the context with its
    # sockets still open and waited for them for ever.
    done = run_python(DROPPED_UNCLOSED % server.address, timeout=20)
    assert done.returncode == 0 and done.stdout.strip() == "collected", done.stderr


def test_close_twice_is_harmless():
    connection = Connection("tcp://127.0.0.1:9", codec, timeout=0.1, retries=0)
    connection.close()
    connection.close()
    with pytest.raises(ClientClosed):
        connection.request("ping", {})


@pytest.mark.parametrize("address", ["not-an-endpoint", "tcp://", "bogus://x", 5, None,
                                     "tcp://127.0.0.1:70000", "tcp://127.0.0.1:-1",
                                     "tcp://127.0.0.1:5555x"])
def test_an_address_that_is_no_endpoint_is_an_address_error(address):
    with pytest.raises(AddressError, match="cannot connect to"):
        Connection(address, codec, timeout=0.1, retries=0)


@pytest.mark.parametrize("options, error, message", [
    ({"timeout": "1"}, TypeError, "timeout is a number of seconds"),
    ({"timeout": 0}, ValueError, "positive"),
    ({"timeout": float("nan")}, ValueError, "positive"),
    ({"retries": -1}, ValueError, "retries is a number"),
    ({"retries": 1.5}, ValueError, "retries is a number"),
    ({"spin": "0"}, TypeError, "spin is a number of seconds"),
    ({"spin": -0.001}, ValueError, "from 0 to"),
    ({"spin": MAX_SPIN * 2}, ValueError, "from 0 to"),
    ({"spin": float("nan")}, ValueError, "from 0 to"),
])
def test_bad_timeouts_retries_and_spins_are_refused_at_once(options, error, message):
    with pytest.raises(error, match=message):
        Connection("tcp://127.0.0.1:9", codec, **options)


@pytest.mark.parametrize("curve", [
    (b"short", b"x" * 32, b"y" * 32),          # once a bare zmq.ZMQError
    ("z" * 39, "a" * 40, "b" * 40),
    (b"k" * 32, b"k" * 32),                     # not three keys
    5,
])
def test_bad_curve_keys_are_a_curve_key_error(curve):
    with pytest.raises(CurveKeyError):
        Connection("tcp://127.0.0.1:9", codec, timeout=0.1, retries=0, curve=curve)


@pytest.mark.parametrize("broadcast, address, reached", [
    # A server bound to all interfaces advertises a wildcard host, which no
    # client can connect to: the host the client reached the server at is used.
    # (Only strings here: nothing connects.)
    ("tcp://0.0.0.0:6001", "tcp://localhost:6000", "tcp://localhost:6001"),
    ("tcp://*:6001", "tcp://127.0.0.1:6000", "tcp://127.0.0.1:6001"),
    ("tcp://[::]:6001", "tcp://[::1]:6000", "tcp://[::1]:6001"),
    ("tcp://127.0.0.1:6001", "tcp://127.0.0.1:6000", "tcp://127.0.0.1:6001"),
    ("ipc:///tmp/b.sock.pub", "ipc:///tmp/b.sock", "ipc:///tmp/b.sock.pub"),
])
def test_a_wildcard_broadcast_host_becomes_the_server_s_host(broadcast, address, reached):
    assert reachable_broadcast(broadcast, address) == reached


def test_a_use_lock_refuses_once_closed_and_is_reentrant_until_then():
    lock = UseLock()
    with lock:
        with lock:
            pass
    lock.closed = True
    with pytest.raises(ClientClosed):
        with lock:
            pass
    assert lock.rlock.acquire(blocking=False)  # not left held by the refusal
    lock.rlock.release()
