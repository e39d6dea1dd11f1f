"""What each recent committed transaction changed, for clients catching up.

A client's sync and commit requests carry the last tid it knows; the
server answers with the oids changed since, so the client drops exactly
those from its cache.  The server keeps this for its latest transactions
only, bounded in count and in oids: a client further behind is told to
flush its whole cache instead.
"""

import bisect
import threading

from zope.interface import implementer

from broker.interfaces import IInvalidationHistory


@implementer(IInvalidationHistory)
class InvalidationHistory:
    """The oids changed by each committed transaction, for the last `size` of
    them and at most `max_oids` oids in all (the oldest go first).

    Fed by the database's subscribe callback (any thread), read by sync and
    commit handlers.  It knows every committed tid in (floor, top].
    """

    def __init__(self, floor, size=10000, max_oids=1000000):
        self._lock = threading.Lock()
        self._tids = []
        self._oids = []
        self._held = 0  # oids in _oids
        self.floor = floor
        self.top = floor
        self.size = size
        self.max_oids = max_oids

    def add(self, tid, oids):
        with self._lock:
            if tid <= self.top:
                return  # already known (a duplicate notification)
            self._tids.append(tid)
            self._oids.append(oids)
            self._held += len(oids)
            self.top = tid
            drop = 0
            while drop < len(self._tids) and (len(self._tids) - drop > self.size
                                              or self._held > self.max_oids):
                self._held -= len(self._oids[drop])
                drop += 1
            if drop:
                self.floor = self._tids[drop - 1]
                del self._tids[:drop], self._oids[:drop]

    def changes(self, since, upto):
        """Sorted oids changed in (since, upto], or None if not all are known.

        The caller makes sure every callback up to `upto` has run
        (BrokerServer.sync_database).
        """
        with self._lock:
            if since is None or since < self.floor:
                return None
            if since >= upto:
                return []
            start = bisect.bisect_right(self._tids, since)
            end = bisect.bisect_right(self._tids, upto)
            changed = set()
            for oids in self._oids[start:end]:
                changed.update(oids)
            return sorted(changed)
