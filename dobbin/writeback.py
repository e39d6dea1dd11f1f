"""Syncing a long copy while it goes on.

A large stored file is copied into the log block by block, then synced
with its record.  Synced only at the end, the disk starts on the bulk of
it only once the copy is done.  `EarlySync` fdatasyncs what has been
written so far in a thread whenever another `every` bytes are written
and no earlier sync is still running, so the disk writes while we copy
and the final sync finds little left to do.  An early sync makes nothing
durable that should not be: the staged bytes lie behind a staging
header that was synced first, and mean nothing until their record's
trailer is written and synced.
"""

import threading

# Early syncs start after this many bytes written since the last one.
EVERY = 8 * 1024 * 1024


class EarlySync:
    """Background fdatasyncs of one copy through `sync` (a no-argument call),
    none if `every` is None.

    Call `wrote(n)` after each write and `finish()` once the copy is done
    or abandoned: it waits for the running sync, and raises the OSError
    of one that failed.
    """

    def __init__(self, sync, every=EVERY):
        self._sync = sync
        self.every = every
        self._unsynced = 0
        self._thread = None
        self._error = None
        self.started = 0

    def wrote(self, size):
        self._unsynced += size
        if self.every is None or self._unsynced < self.every or (self._thread is not None
                                           and self._thread.is_alive()):
            return
        self._raise_failure()
        self._unsynced = 0
        self.started += 1
        self._thread = threading.Thread(target=self._run, name="dobbin-early-sync",
                                        daemon=True)
        self._thread.start()

    def _run(self):
        try:
            self._sync()
        except OSError as error:
            self._error = error

    def finish(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_failure()

    def _raise_failure(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error
