"""What the server holds for connections that do not read: bounded.

ZeroMQ holds what a connection does not read: the server's ROUTER keeps
up to its high-water mark of replies per connection (REPLY_QUEUE),
however big each is, and for every connection there is.  So a client
asking for a large object again and again without reading, or many
connections asking for small ones, could make the server hold gigabytes.
Every reply is therefore counted, as its bytes plus REPLY_OVERHEAD, until
ZeroMQ is done with it (has written it to the kernel, or dropped it:
pyzmq's MessageTracker tells), and a reply of any size that would take its
connection, or all of them together, past their bound is dropped.
Dropping is always safe: the client sends the request again after its
timeout, and a write is then answered with its remembered outcome
(broker.outcomes), never run again (an error naming the refusal would
read as "did not run").  A reply goes whatever its size to a connection
with nothing pending (but the small replies of its current frame, see
below) while all of them are within their bound, so that no reply is too
big to send ever.  Past the bound of all of them, a connection with
at most one small reply pending still gets a small reply, out of a
reserve of `reserve_bytes` more: connections that never read, however
much they hold, must not stop the server answering the ones that do (a
client that reads has nothing pending when it asks again, but for the
reply it has just read, which pyzmq may not have reported sent yet).  Such a reply is tracked
alone, so that it stops counting as soon as ZeroMQ has written it.  Other
replies past that bound are dropped, until ZeroMQ has sent enough.

Tracking one message costs pyzmq some microseconds (a frame, an event, a
wake-up of its garbage collector thread), a tenth of a ping's round trip.
So the replies under SHARED_REPLY bytes to a connection share one tracked
object, their magic frame, for REPLY_QUEUE replies and about EPOCH
seconds at most: they count until ZeroMQ is done with all of them.
ZeroMQ takes such a body right after its magic, so at most one per
connection, being written, is held uncounted; and those it drops past
REPLY_QUEUE count as long as the others of their frame.  A bigger reply
is tracked through its body.

All the counts are brought up to date once per as many replies as there
were connections with replies pending when they last were (and a few
more), so that it costs about two connections looked at per reply; the
total may lag behind (too high).  Before a reply is refused, they are
again, or only its connection's if they were less than as many replies
ago.

Only the server's front thread sends, so this needs no lock.
"""

import time

import zmq
from zope.interface import implementer

from broker.interfaces import IReplyBacklog

# Messages held for one connection that is not reading them (ZeroMQ's
# default is 1,000: a client asking for a 1 MiB object without reading
# the replies took a gigabyte of the server's memory).  Past it replies
# are dropped (a client has one request out at a time; one that sends
# more has them answered only while it reads), and broadcasts too (the
# subscriber sees the gap in their numbers and flushes its cache).
REPLY_QUEUE = 64
BROADCAST_QUEUE = 100

#: Bytes a reply counts for besides its body: its other frames, ZeroMQ's
#: messages and pyzmq's tracking (0.9 KiB measured for a reply tracked
#: alone), so that many tiny replies count for what they take.
REPLY_OVERHEAD = 1024

#: Replies smaller than this (ZeroMQ's write batch, which it copies them
#: into) share a tracked magic frame; bigger ones are tracked alone.
SHARED_REPLY = 8 * 1024

#: Seconds after which a connection's small replies stop sharing their
#: frame (when its counts are next brought up to date).
EPOCH = 0.1

_SNDMORE = zmq.SNDMORE
# Calls to admits between bringing all counts up to date: one per
# connection with replies pending, and this many more.
_SWEEP_SLACK = 8


class _Peer:
    """What is pending for one connection."""

    __slots__ = ("bytes", "sent", "frame", "magic", "shared", "left", "since")

    def __init__(self):
        self.bytes = 0       # counted, in all
        self.sent = []       # [tracker, bytes] of the replies not known sent
        self.frame = None    # the magic frame its small replies share now, if any
        self.magic = None    # that frame's bytes
        self.shared = None   # its entry in `sent`
        self.left = 0        # how many more replies it may go in
        self.since = 0.0     # when it was made


@implementer(IReplyBacklog)
class ReplyBacklog:
    """The replies not yet sent, by connection (routing id)."""

    def __init__(self, max_bytes=256 * 1024 * 1024, max_peer_bytes=32 * 1024 * 1024,
                 reserve_bytes=16 * 1024 * 1024):
        self.max_bytes = max_bytes
        self.max_peer_bytes = max_peer_bytes
        self.reserve_bytes = reserve_bytes
        self.pending_bytes = 0
        self.dropped = 0       # replies dropped, ever
        self._peers = {}       # routing id -> _Peer, while it has replies pending
        self._unswept = 0      # calls to admits since all peers were brought up to date
        self._swept_peers = 0  # peers left pending then

    def send(self, router, frames):
        """Send reply `frames` ([routing id, b"", MAGIC, body]) on ROUTER
        `router`, counted until ZeroMQ is done with it; or drop it past the
        bounds."""
        routing, magic, body = frames[0], frames[-2], frames[-1]
        size = len(body) + REPLY_OVERHEAD
        if not self.admits(routing, size):
            self.dropped += 1
            return
        send = router.send
        for frame in frames[:-2]:
            send(frame, _SNDMORE)
        if len(body) >= SHARED_REPLY or self.pending_bytes >= self.max_bytes:
            # Big, or out of the reserve: tracked alone.
            send(magic, _SNDMORE)
            # Without a copy whatever its size: pyzmq cannot track a copied one.
            frame = zmq.Frame(body, copy=False, track=True)
            send(frame, copy=False)
            self.track(routing, size, frame.tracker)
            return
        peer = self._peers.get(routing)
        if peer is None:
            peer = self._peers[routing] = _Peer()
        if peer.frame is None or peer.magic != magic:
            self._share(routing, peer, magic)
        send(peer.frame, _SNDMORE, copy=False)
        send(body)
        peer.shared[1] += size
        peer.bytes += size
        self.pending_bytes += size
        peer.left -= 1
        if not peer.left:
            peer.frame = None  # so that its tracker can be done

    def admits(self, routing, size):
        """True if a reply of `size` bytes to `routing` may be sent now
        (see the module docstring)."""
        self._unswept += 1
        # Not len(self._peers): with one reply to each new connection (pings)
        # it grows as fast as the calls, and the sweep never came.
        if self._unswept > self._swept_peers + _SWEEP_SLACK:
            self._sweep()
        if self._within(routing, size):
            return True
        # Not refused for counts behind (see the module docstring).
        if self._unswept >= self._swept_peers:
            self._sweep()
        else:
            peer = self._peers.get(routing)
            if peer is not None:
                self._forget_sent(routing, peer, time.monotonic())
        return self._within(routing, size)

    def track(self, routing, size, tracker):
        """Count `size` bytes sent to `routing` until `tracker` is done."""
        peer = self._peers.get(routing)
        if peer is None:
            peer = self._peers[routing] = _Peer()
        peer.sent.append([tracker, size])
        peer.bytes += size
        self.pending_bytes += size

    def _within(self, routing, size):
        peer = self._peers.get(routing)
        if peer is None:
            peer_bytes = earlier = 0
        else:
            peer_bytes = earlier = peer.bytes
            if peer.frame is not None:
                earlier -= peer.shared[1]
        if not earlier and self.pending_bytes < self.max_bytes:
            return True
        small = SHARED_REPLY + REPLY_OVERHEAD
        # At most one small reply pending: the one a reading client has just
        # read may not be reported sent yet (pyzmq's garbage collector
        # thread tells, when it gets the GIL).
        if (peer_bytes < small and size < small and peer_bytes + size <= self.max_peer_bytes
                and self.pending_bytes + size <= self.max_bytes + self.reserve_bytes):
            return True  # out of the reserve
        return (peer_bytes + size <= self.max_peer_bytes
                and self.pending_bytes + size <= self.max_bytes)

    def _share(self, routing, peer, magic):
        """Give `peer` a new magic frame for its small replies."""
        peer.frame = None  # the one before: its tracker can be done now
        now = time.monotonic()
        self._forget_sent(routing, peer, now)
        frame = zmq.Frame(magic, copy=False, track=True)
        peer.frame, peer.magic, peer.since, peer.left = frame, magic, now, REPLY_QUEUE
        peer.shared = [frame.tracker, 0]
        peer.sent.append(peer.shared)
        self._peers[routing] = peer  # again, if it had nothing pending

    def _sweep(self):
        self._unswept = 0
        now = time.monotonic()
        for routing, peer in list(self._peers.items()):
            self._forget_sent(routing, peer, now)
        self._swept_peers = len(self._peers)

    def _forget_sent(self, routing, peer, now):
        if peer.frame is not None:
            if now - peer.since > EPOCH:
                peer.frame = None  # so that its tracker can be done
            elif len(peer.sent) == 1:
                return  # just the frame in use's replies: not done
        # Every entry is looked at: ZeroMQ is done at once with a reply it
        # drops past REPLY_QUEUE, before the ones it holds.
        sent = peer.sent
        still = [entry for entry in sent if not entry[0].done]
        if len(still) == len(sent):
            return
        held = sum(entry[1] for entry in still)
        self.pending_bytes -= peer.bytes - held
        peer.bytes, peer.sent = held, still
        if not still:
            del self._peers[routing]
