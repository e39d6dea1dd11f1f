"""What the server holds for connections that do not read: bounded.

ZeroMQ holds what a connection does not read: the server's ROUTER keeps
up to its high-water mark of replies per connection (REPLY_QUEUE),
however big each is.  So a client asking for a large object
again and again without reading, or several such clients, could make the
server hold gigabytes.  Big replies are therefore sent tracked (pyzmq's
MessageTracker says when ZeroMQ is done with a message: written to the
kernel, or dropped), and a big reply that would take a connection, or all
of them together, past their bound is dropped.  Dropping is always safe:
the client sends the request again after its timeout, and a write is then
answered with its remembered outcome (broker.outcomes), never run again
(an error naming the refusal would read as "did not run").  A reply goes
whatever its size to a connection with nothing pending while all of them
are within their bound, so that no reply is too big to send ever.

Only the server's front thread sends, so this needs no lock.
"""

import zmq
from zope.interface import implementer

from broker.interfaces import IReplyBacklog
from broker.transport import send_frames

# Messages held for one connection that is not reading them (ZeroMQ's
# default is 1,000: a client asking for a 1 MiB object without reading
# the replies took a gigabyte of the server's memory).  Past it replies
# are dropped (a client has one request out at a time; one that sends
# more has them answered only while it reads), and broadcasts too (the
# subscriber sees the gap in their numbers and flushes its cache).
REPLY_QUEUE = 64
BROADCAST_QUEUE = 100

#: Replies at least this big are tracked (smaller ones are bounded by the
#: ROUTER's high-water mark: 64 of them per connection).
TRACKED_REPLY = 64 * 1024


@implementer(IReplyBacklog)
class ReplyBacklog:
    """The tracked replies not yet sent, by connection (routing id)."""

    def __init__(self, max_bytes=256 * 1024 * 1024, max_peer_bytes=32 * 1024 * 1024):
        self.max_bytes = max_bytes
        self.max_peer_bytes = max_peer_bytes
        self.pending_bytes = 0
        self.dropped = 0       # replies dropped, ever
        self._pending = []     # (tracker, routing id, size)
        self._by_peer = {}     # routing id -> bytes pending

    def send(self, router, frames):
        routing, body = frames[0], frames[-1]
        if len(body) < TRACKED_REPLY:
            send_frames(router, frames)
        elif self.admits(routing, len(body)):
            for frame in frames[:-1]:
                router.send(frame, zmq.SNDMORE)
            self.track(routing, len(body), router.send(body, copy=False, track=True))
        else:
            self.dropped += 1

    def admits(self, routing, size):
        self._forget_sent()
        peer_bytes = self._by_peer.get(routing, 0)
        if not peer_bytes and self.pending_bytes < self.max_bytes:
            return True
        return (peer_bytes + size <= self.max_peer_bytes
                and self.pending_bytes + size <= self.max_bytes)

    def track(self, routing, size, tracker):
        self._pending.append((tracker, routing, size))
        self.pending_bytes += size
        self._by_peer[routing] = self._by_peer.get(routing, 0) + size

    def _forget_sent(self):
        if not self._pending:
            return
        still = []
        for entry in self._pending:
            tracker, routing, size = entry
            if not tracker.done:
                still.append(entry)
                continue
            self.pending_bytes -= size
            left = self._by_peer[routing] - size
            if left:
                self._by_peer[routing] = left
            else:
                del self._by_peer[routing]
        self._pending = still

