"""broker.backlog: big replies not yet sent, bounded per connection and in all."""

from zope.interface.verify import verifyObject

from broker.backlog import ReplyBacklog
from broker.interfaces import IReplyBacklog


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


def test_a_connection_with_nothing_pending_gets_one_reply_of_any_size_while_all_are_within():
    backlog = ReplyBacklog(max_bytes=300, max_peer_bytes=250)
    assert backlog.admits(b"a", 10_000)
    tracker = Tracker()
    backlog.track(b"a", 10_000, tracker)
    assert not backlog.admits(b"a", 10) and not backlog.admits(b"b", 10)  # all: past 300
    tracker.done = True
    assert backlog.admits(b"b", 10) and backlog.pending_bytes == 0
    backlog.track(b"b", 200, Tracker())
    assert backlog.admits(b"c", 10_000)  # nothing of its own pending, all within
