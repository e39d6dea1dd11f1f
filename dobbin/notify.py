"""Telling subscribers of committed transactions, in tid order, once durable.

A database notes each committed record it takes in (its own commits and
those it catches up with) and flushes its notes outside its state lock:
each subscriber is called with (tid, frozenset of changed oids), in tid
order across threads, once the record is durable.  A subscriber may call
back into the database (sync() included); one that raises is logged and
the others still run.
"""

import collections
import logging
import threading

from zope.interface import implementer

from dobbin.exc import DobbinError, InvalidTypeError
from dobbin.interfaces import INotifier

logger = logging.getLogger("dobbin")


@implementer(INotifier)
class Notifier:
    """The subscribers of one database, and its notes not yet told."""

    def __init__(self, log):
        self._log = log
        # Reentrant: a subscriber may call sync(), which flushes.
        self.lock = threading.RLock()
        self._notes = collections.deque()
        self._subscribers = []
        self._threads = threading.local()

    def subscribe(self, callback):
        if not callable(callback):
            raise InvalidTypeError("a subscriber is called with (tid, oids), not %r" % (callback,))
        self._subscribers.append(callback)

    def unsubscribe(self, callback):
        self._subscribers.remove(callback)

    def note(self, durable_at, tid, oids, ours=True):
        self._notes.append((durable_at, tid, oids, ours))

    def clear(self):
        self._notes.clear()

    def flush(self, wait=False):
        # With `wait`, return only after callbacks another thread is still
        # running have finished, so sync() can promise they have all run.
        if not wait and not self._notes or getattr(self._threads, "notifying", False):
            return  # nothing to do, or called by a subscriber: the outer loop goes on
        # Notes are queued in tid order under the state lock; this lock
        # keeps them in that order across threads.
        with self.lock:
            while self._notes:
                try:
                    durable_at, tid, oids, ours = self._notes[0]
                    log = self._log
                    if (durable_at > log.synced_end and log.durability == "fsync"
                            and log.broken is None and self._subscribers):
                        if ours:
                            # Its writer will flush it once the fsync is done.  (Once
                            # one failed, none is; the database shows the change.)
                            break
                        _make_durable(log, durable_at)
                    self._notes.popleft()
                except IndexError:
                    break
                self._threads.notifying = True  # in tid order: no nested flush
                try:
                    for callback in list(self._subscribers):
                        try:
                            callback(tid, oids)
                        except Exception:
                            logger.exception("subscriber %r failed on transaction %d",
                                             callback, tid)
                finally:
                    self._threads.notifying = False


def _make_durable(log, end):
    """fdatasync the file up to `end`: another writer's record, which it
    may not have synced yet (its fsync covers our descriptor too, and ours
    its).  A failure leaves the log broken, and then it is told anyway,
    as a failed fsync of our own is."""
    try:
        log.flush(end)
    except DobbinError as error:
        logger.warning("%s: could not make transactions up to offset %d durable before "
                       "telling subscribers: %s", log.path, end, error)
