"""The write lock: one writer at a time, across threads and processes.

`flock` on the database's own file descriptor is the inter-process part.
It belongs to the open file description, so it is released by the
kernel the moment its holder dies (even by SIGKILL), two `Database`
instances in one process exclude each other, and closing some other
descriptor of the same file does not drop it (unlike POSIX `fcntl`
locks).  Threads sharing one descriptor are ordered by a mutex first.

For the same reason a forked child shares its parent's hold: any flock
call of the child's on the inherited descriptor would take, convert or
drop the parent's lock.  So the lock refuses every use outside the
process that made it.  Once `closing()` has let the file close, the lock
refuses every use too: its descriptor number may belong to another file
by then, whose lock a flock call would take or drop.
"""

import contextlib
import fcntl
import os
import threading
import time

from zope.interface import implementer

from dobbin.exc import (DobbinError, InvalidTypeError, InvalidValueError, LockTimeoutError,
                        ReadOnlyError)
from dobbin.interfaces import IWriteLock

# Poll interval bounds while another process holds the lock: short enough
# that a handover costs little, long enough not to burn a core.
_FIRST_WAIT = 0.00005
_LONGEST_WAIT = 0.005


def flock_within(fd, kind, timeout, purpose):
    """Take file lock `kind` (fcntl.LOCK_EX or LOCK_SH) on `fd`, waiting
    up to `timeout` seconds; LockTimeoutError names the `purpose`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LockTimeoutError("could not lock the file to %s" % purpose) from None
            time.sleep(0.001)


def checked_timeout(timeout):
    """`timeout`, a finite number of seconds >= 0, at most
    threading.TIMEOUT_MAX (about 292 years: a longer one, a way to say
    "for ever", is cut to it); TypeError or ValueError otherwise."""
    if type(timeout) not in (int, float):
        raise InvalidTypeError("the lock timeout is a number of seconds, not %r" % (timeout,))
    if not 0 <= timeout < float("inf"):
        raise InvalidValueError("the lock timeout must be from 0 to a finite number of seconds, "
                                "not %r" % (timeout,))
    return min(timeout, threading.TIMEOUT_MAX)


@implementer(IWriteLock)
class WriteLock:
    """An exclusive lock on an open file, with a timeout."""

    def __init__(self, fd, path, timeout=30.0):
        self.timeout = checked_timeout(timeout)
        self.fd = fd
        self.path = path
        self._mutex = threading.Lock()
        self._owner = None
        self._pid = os.getpid()
        self._retired = False  # closing() ran: the descriptor is no longer ours

    def _check_retired(self):
        """Under the mutex: refuse a flock on a descriptor closed by closing()."""
        if self._retired:
            self._mutex.release()
            raise ReadOnlyError("%s is closed" % self.path)

    def _check_process(self):
        if os.getpid() != self._pid:
            raise DobbinError("the write lock of %s belongs to process %d; a forked child "
                              "must open the database anew" % (self.path, self._pid))

    def acquire(self, timeout=None):
        """Take the lock, waiting up to `timeout` seconds (default: ours)."""
        self._check_process()
        if timeout is None:
            timeout = self.timeout
        if self._owner == threading.get_ident():
            raise RuntimeError("the write lock of %s is not reentrant" % self.path)
        deadline = time.monotonic() + timeout
        if not self._mutex.acquire(timeout=max(timeout, 0)):
            raise LockTimeoutError("another thread held the write lock of %s for more than %.3gs"
                                   % (self.path, timeout))
        self._check_retired()
        try:
            wait = _FIRST_WAIT
            while True:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise LockTimeoutError(
                            "another process held the write lock of %s for more than %.3gs"
                            % (self.path, timeout)) from None
                    time.sleep(min(wait, remaining))
                    wait = min(wait * 2, _LONGEST_WAIT)
        except BaseException:
            self._mutex.release()
            raise
        self._owner = threading.get_ident()

    def release(self):
        """Give the lock up; only its holder may."""
        # A child forked by the holding thread passes the owner check: its
        # flock call would drop the parent's lock.
        self._check_process()
        if self._owner != threading.get_ident():
            raise RuntimeError("the write lock of %s is not held by this thread" % self.path)
        self._owner = None
        try:
            if not self._retired:  # else closing the descriptor gave the flock up
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    @contextlib.contextmanager
    def closing(self, timeout=None):
        """Hold this process's writers off while the caller closes the file.

        Waits up to `timeout` for a thread that holds the lock (or is
        taking it) to give it up, then keeps the others out until the
        block ends: a write must never go to a descriptor that closed
        under it and was reused.  Yields True if no other process held
        the file lock either (it is then ours, for the caller to tidy the
        file up; closing the descriptor inside the block gives it back).
        The calling thread's own hold, if any, is simply kept.  After the
        block the lock is retired: acquire() and closing() raise
        ReadOnlyError, and busy() is False.
        """
        self._check_process()
        if self._owner == threading.get_ident():
            try:
                yield False
            finally:
                self._retired = True
            return
        if timeout is None:
            timeout = self.timeout
        if not self._mutex.acquire(timeout=max(timeout, 0)):
            raise LockTimeoutError("another thread held the write lock of %s for more than %.3gs"
                                   % (self.path, timeout))
        self._check_retired()
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free = True
            except BlockingIOError:
                free = False  # another process writes, through its own descriptor
            yield free
        finally:
            self._retired = True
            self._mutex.release()

    def busy(self):
        """True when a thread or process holds the lock (or is taking it).

        A hint, for choosing where to wait: the answer may be stale at once.
        """
        self._check_process()
        if not self._mutex.acquire(blocking=False):
            return True
        if self._retired:
            self._mutex.release()
            return False
        try:
            # Holding the mutex, no thread of ours holds the flock, so
            # releasing the one we may get here drops nobody else's.
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            return False
        finally:
            self._mutex.release()

    @property
    def held(self):
        """True when the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()
