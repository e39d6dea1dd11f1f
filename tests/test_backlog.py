"""broker.backlog: replies not yet sent, bounded per connection and in all."""

import pytest
import zmq
from zope.interface.verify import verifyObject

from broker.backlog import REPLY_OVERHEAD, REPLY_QUEUE, SHARED_REPLY, ReplyBacklog
from broker.interfaces import IReplyBacklog
from broker.protocol import MAGIC
from broker_fixtures import wait_until


class Tracker:
    """A stand-in for pyzmq's MessageTracker."""

    done = False


def test_implements_interface():
    assert verifyObject(IReplyBacklog, ReplyBacklog())


def test_a_connection_gets_up_to_its_bound_then_again_once_its_replies_are_sent():
    backlog = ReplyBacklog(max_bytes=1000, max_peer_bytes=250)
    trackers = []
    for _ in range(2):
        assert backlog.admits(b"a", 100)
        trackers.append(Tracker())
        backlog.track(b"a", 100, trackers[-1])
    assert not backlog.admits(b"a", 100)  # 300 > 250
    assert backlog.admits(b"b", 100)  # another connection has its own bound
    trackers[0].done = True
    assert backlog.admits(b"a", 100) and backlog.pending_bytes == 100


def test_all_connections_together_are_bounded():
    backlog = ReplyBacklog(max_bytes=300, max_peer_bytes=250, reserve_bytes=0)
    for peer in [b"a", b"b", b"c"]:
        assert backlog.admits(peer, 100)
        backlog.track(peer, 100, Tracker())
    assert not backlog.admits(b"d", 100) and backlog.pending_bytes == 300


def test_past_the_bound_of_all_small_replies_to_connections_with_little_pending_use_a_reserve():
    # Connections that never read held the bound full: every reply to the
    # ones that do was dropped, for as long as they stayed connected.
    small = SHARED_REPLY + REPLY_OVERHEAD
    backlog = ReplyBacklog(max_bytes=300, max_peer_bytes=2 * small, reserve_bytes=3 * small)
    for peer in [b"a", b"b", b"c"]:
        backlog.track(peer, 100, Tracker())
    assert not backlog.admits(b"d", small)  # not small: no
    # Less than a small reply pending: the one a reader has just read may
    # not be reported sent yet (that dropped replies to readers now and then).
    assert backlog.admits(b"a", 10)
    backlog.track(b"a", small - 100, Tracker())
    assert not backlog.admits(b"a", 10)  # a small reply's worth pending: no
    assert backlog.admits(b"d", small - 1)
    backlog.track(b"d", small - 1, Tracker())
    room = backlog.max_bytes + backlog.reserve_bytes - backlog.pending_bytes
    assert backlog.admits(b"e", room) is (room < small)
    assert not backlog.admits(b"e", room + 1)  # within the reserve


def test_connections_that_ask_once_each_are_forgotten_once_answered():
    # The counts were brought up to date once per as many replies as there
    # were connections pending, and with one reply to each new connection
    # both grew alike: 3,000 health-check pings stayed counted for ever, and
    # the bound of all then dropped the replies to new connections.
    backlog = ReplyBacklog(max_bytes=100 * 1000, max_peer_bytes=1000, reserve_bytes=0)
    for n in range(3000):
        peer = b"ping%d" % n
        assert backlog.admits(peer, 1000), "connection %d refused" % n
        tracker = Tracker()
        backlog.track(peer, 1000, tracker)
        tracker.done = True  # answered, and gone
    assert len(backlog._peers) < 100 and backlog.pending_bytes < 100 * 1000


def test_a_connection_with_nothing_pending_gets_one_reply_of_any_size_while_all_are_within():
    backlog = ReplyBacklog(max_bytes=300, max_peer_bytes=250, reserve_bytes=0)
    assert backlog.admits(b"a", 10_000)
    tracker = Tracker()
    backlog.track(b"a", 10_000, tracker)
    assert not backlog.admits(b"a", 10) and not backlog.admits(b"b", 10)  # all: past 300
    tracker.done = True
    assert backlog.admits(b"b", 10) and backlog.pending_bytes == 0
    backlog.track(b"b", 200, Tracker())
    assert backlog.admits(b"c", 10_000)  # nothing of its own pending, all within


@pytest.fixture
def router():
    """(ROUTER socket taking in little, connect(routing id) -> a DEALER it knows)."""
    context = zmq.Context()
    sockets = []

    def socket(kind, **options):
        sock = context.socket(kind)
        sockets.append(sock)
        for option, value in dict(options, LINGER=0).items():
            sock.setsockopt(getattr(zmq, option), value)
        return sock

    server = socket(zmq.ROUTER, SNDHWM=REPLY_QUEUE, SNDBUF=4096)
    address = "tcp://127.0.0.1:%d" % server.bind_to_random_port("tcp://127.0.0.1")

    def connect(routing):
        # One that reads next to nothing unless told to.
        dealer = socket(zmq.DEALER, ROUTING_ID=routing, RCVHWM=1, RCVBUF=4096)
        dealer.connect(address)
        dealer.send(b"hello")
        assert server.poll(5000) and server.recv_multipart() == [routing, b"hello"]
        return dealer

    try:
        yield server, connect
    finally:
        for sock in sockets:
            sock.close(0)
        context.term()


def reply(routing, body):
    return [routing, b"", MAGIC, body]


def test_a_reply_of_any_size_counts_until_zeromq_is_done_with_it(router):
    # Replies under 64 KiB were not counted at all: 64 per connection, for
    # as many connections as did not read them.
    server, connect = router
    backlog = ReplyBacklog()
    reader = connect(b"reader")
    for body in [b"pong", b"x" * 100_000]:
        backlog.send(server, reply(b"reader", body))
        assert backlog.pending_bytes == len(body) + REPLY_OVERHEAD  # a tiny one too
        assert reader.poll(5000) and reader.recv_multipart() == [b"", MAGIC, body]
        assert wait_until(lambda: backlog.admits(b"other", 1) and not backlog.pending_bytes)


def test_small_replies_to_connections_that_do_not_read_are_bounded_in_all(router):
    server, connect = router
    backlog = ReplyBacklog(max_bytes=64 * 1024)
    slow = [b"slow%d" % n for n in range(4)]
    for routing in slow:
        connect(routing)
    body = b"x" * 1000
    for _ in range(300):
        for routing in slow:
            backlog.send(server, reply(routing, body))
    # 2.4 MB: more than the kernel takes for connections reading nothing.
    assert backlog.dropped
    assert backlog.pending_bytes <= backlog.max_bytes + len(body) + REPLY_OVERHEAD


def test_past_the_bound_of_all_a_reader_is_still_answered(router):
    server, connect = router
    backlog = ReplyBacklog(max_bytes=10_000, reserve_bytes=5_000)
    backlog.track(b"never reads", 10_000, Tracker())
    reader = connect(b"reader")
    for n in range(5):
        body = b"pong %d" % n
        backlog.send(server, reply(b"reader", body))
        assert reader.poll(5000) and reader.recv_multipart() == [b"", MAGIC, body]
        # Tracked alone: it stops counting once written, not an epoch later.
        assert wait_until(lambda: backlog.admits(b"reader", 100))
    assert backlog.dropped == 0
    backlog.send(server, reply(b"reader", b"x" * SHARED_REPLY))  # not out of the reserve
    assert backlog.dropped == 1


def test_replies_zeromq_drops_past_its_queue_stop_counting(router):
    # Small replies share a tracked frame, REPLY_QUEUE of them at most: the
    # ones ZeroMQ drops count as long as the others of their frame.
    server, connect = router
    backlog = ReplyBacklog()
    connect(b"slow")
    size = 1000 + REPLY_OVERHEAD
    for _ in range(500):
        backlog.send(server, reply(b"slow", b"x" * 1000))
    assert not backlog.dropped  # by the backlog: ZeroMQ dropped most
    # ZeroMQ holds REPLY_QUEUE at most (and one it is writing): two frames'.
    assert wait_until(lambda: backlog.admits(b"other", 1)
                      and backlog.pending_bytes <= (2 * REPLY_QUEUE + 1) * size)
    assert backlog.pending_bytes >= size  # what ZeroMQ holds still counts
