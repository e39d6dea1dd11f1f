"""Commit outcomes remembered by token, so that a resent commit is answered, not run again.

A client that gets no reply in time sends its request again, on a fresh
socket (broker.transport).  For a commit that first copy may still be
queued or running, or done with its reply lost: running the copy too
would apply the changes twice, or fail it on its own first run's writes.
Each commit carries a random token; the server runs one request per
(token, request id) and answers every copy with that one outcome.

Outcomes live in memory, for the last `max_entries` commits and at most
`max_bytes` of replies: long past any client's retries.  A copy that
reaches another server instance (after a restart) runs again there; its
verified old values then no longer match, so it fails instead of
applying twice.
"""

import collections
import threading

from zope.interface import implementer

from broker.interfaces import ICommitOutcomes

RUN = "run"
WAIT = "wait"


@implementer(ICommitOutcomes)
class CommitOutcomes:
    """The outcomes of recent commits, by (token, request id)."""

    def __init__(self, max_entries=10000, max_bytes=16 * 1024 * 1024):
        self._lock = threading.Lock()
        self._running = {}  # key -> routing ids of the copies waiting for it
        self._done = collections.OrderedDict()  # key -> encoded reply
        self._bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def start(self, key, routing):
        """RUN if the caller is to run this commit, WAIT if a copy is running
        (`routing` gets its reply), or the encoded reply of the finished one."""
        with self._lock:
            reply = self._done.get(key)
            if reply is not None:
                return reply
            waiting = self._running.get(key)
            if waiting is not None:
                waiting.append(routing)
                return WAIT
            self._running[key] = []
            return RUN

    def finish(self, key, reply):
        """Remember the encoded `reply`; return the routing ids of the copies to answer."""
        with self._lock:
            waiting = self._running.pop(key, [])
            self._done[key] = reply
            self._bytes += len(reply)
            while self._done and (len(self._done) > self.max_entries
                                  or self._bytes > self.max_bytes):
                _key, dropped = self._done.popitem(last=False)
                self._bytes -= len(dropped)
            return waiting

    def abandon(self, key):
        """The commit will not run here (the server is stopping): forget it."""
        with self._lock:
            self._running.pop(key, None)
