"""Disk space allocated ahead of the records, so a small commit's fsync has no
new file size to make durable (see docs/format.txt, "Reserved space after the records").

`ReservedSpace` is the part of `dobbin.log.Log` that allocates that space
and gives it back; it uses the log's `fd`, `path`, `end`, `read_only`,
`broken`, `size()`, `_peek()`, `_records_kept()` and `_check_writable()`.
Readers treat the zeros after the records as the end of the file.
"""

import errno
import os

from dobbin.exc import StorageError
from dobbin.reader import reserved_head, zeros_from

# Space reserved ahead of the records at a time.
RESERVE = 256 * 1024
# fallocate is not supported here (a file system without it): append as before.
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class ReservedSpace:
    """Allocating the file ahead of the records, and giving it back."""

    # -- I/O seam: tests replace it to inject failures ----------------

    def _allocate(self, offset, length):
        os.posix_fallocate(self.fd, offset, length)

    def _reserve(self, offset, length):
        """Allocate space ahead of a small record, so that its fsync need not
        also make a new file size durable (see docs/format.txt)."""
        if not self._reserving or length > RESERVE:
            return
        try:
            self._allocated(offset, length)
        except OSError as error:
            # Append as without reserving: for good where the file system has
            # no fallocate, this time only if the disk is full (the write
            # itself then tells).
            self._reserving = error.errno not in _NO_FALLOCATE

    def claim(self, offset, length):
        """Allocate the disk space of a record before its commit votes yes, so
        that a full disk fails the vote, not the finish (where the file
        system can't allocate ahead, nothing is promised)."""
        self._check_writable()  # closed by the committing thread itself, say
        try:
            self._allocated(offset, length, look=True)
        except OSError as error:
            if error.errno not in _NO_FALLOCATE:
                raise StorageError("no room for a record of %d bytes in %s: %s"
                                   % (length, self.path, error)) from error

    def _allocated(self, offset, length, look=False):
        """Make sure `length` bytes at `offset` are allocated, reserving
        ahead when a small record's are not; with `look`, whatever this log
        reserved before (a commit's vote must not count on it)."""
        if look or offset + length > self._reserved:
            # The file as it is: another writer (an instance, a process)
            # may have reserved more, or given our reserve back (`trim` on
            # closing), since we last held the write lock.  Its length by
            # lseek, not fstat: see Log._peek.
            self._reserved = os.lseek(self.fd, 0, os.SEEK_END)
        if offset + length <= self._reserved:
            return
        ahead = RESERVE if self._reserving and length <= RESERVE else 0
        try:
            self._allocate(offset, length + ahead)
        except OSError:
            if not ahead:
                raise
            # A nearly full disk: the record alone may still fit.
            self._allocate(offset, length)
            ahead = 0
        self._reserved = offset + length + ahead

    def trim(self):
        """Give back the space reserved after the records (write lock held).
        Only from a zero header at `end`: no other writer's records follow."""
        if self.fd is None or self.read_only or self.broken is not None:
            return
        try:
            if (reserved_head(self._peek()) and self._reserved_space_here()
                    and self._records_kept()):
                # Not the I/O seam, and no fsync: only zeros go, so a failed
                # or lost cut leaves the file as valid as a done one.
                os.ftruncate(self.fd, self.end)
                self._reserved = self.end
        except OSError:
            pass  # only space is at stake

    def _reserved_space_here(self):
        """Do the records end at `self.end`, before reserved space?

        With the write lock held: the first time, every byte after is
        checked to be zero (a non-zero one is a write torn by a crash);
        since only lock holders write, at the end of the records (staged
        bytes of a failed commit are cut back), that holds.
        """
        if not self._tail_checked:
            self._tail_checked = zeros_from(self.fd, self.end, self.size())
        return self._tail_checked
