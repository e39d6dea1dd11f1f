"""broker.backlog: big replies not yet sent, bounded per connection and in all."""

from zope.interface.verify import verifyObject

from broker import protocol
from broker.backlog import ReplyBacklog, reply_id
from broker.codec import Codec
from broker.interfaces import IReplyBacklog

codec = Codec()


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
    backlog = ReplyBacklog(max_bytes=300, max_peer_bytes=250)
    for peer in [b"a", b"b", b"c"]:
        assert backlog.admits(peer, 100)
        backlog.track(peer, 100, Tracker())
    assert not backlog.admits(b"d", 100) and backlog.pending_bytes == 300


def test_one_reply_goes_whatever_its_size_when_nothing_is_pending():
    backlog = ReplyBacklog(max_bytes=300, max_peer_bytes=250)
    assert backlog.admits(b"a", 10_000)
    tracker = Tracker()
    backlog.track(b"a", 10_000, tracker)
    assert not backlog.admits(b"b", 10)
    tracker.done = True
    assert backlog.admits(b"b", 10) and backlog.pending_bytes == 0


def test_reply_id_reads_the_id_of_encoded_replies_only():
    assert reply_id(codec.encode(protocol.ok_reply(42, 7, b"x" * 100_000))) == 42
    assert reply_id(codec.encode(protocol.error_reply(9, 7, {"type": "Busy"}))) == 9
    for data in [b"", b"\x91\x01", codec.encode({"srv": 1, "id": 3}), b"\xc1" * 40,
                 codec.encode(protocol.ok_reply(None, 7, None))]:
        assert reply_id(data) is None
