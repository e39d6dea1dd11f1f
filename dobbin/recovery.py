"""Recovery: a torn tail told from damage in the log, and cut back.

`Recovery` is the part of `dobbin.log.Log` that deals with what it cannot
read (see "Reading rules" in docs/format.txt).  A torn tail (no later
record vouches for it) is cut back, its bytes kept beside the file;
damage that a later record proves was durable raises `CorruptionError`,
or with `repair` is cut away too; a damaged checkpoint, being redundant,
is stepped over.  `diagnose` tells the same apart for a reader holding no
lock.  It uses the log's `fd`, `path`, `end`, `last_tid`, `checkpoint`,
`read_only`, `broken`, `skipped`, `_tail`, `size()`, `check_same_file()`,
`_peek()`, `_advance()`, `_truncate()`, `_exclusive_sync()`,
`_fsync_directory()` and `_reserved_space_here()`; the log's `follow` and `_create` use
`_sound_at`, `_skip` and `_save_tail`.
"""

import hashlib
import os

from dobbin.exc import CorruptionError, StorageError
from dobbin.record import TX_HEADER_SIZE, parse_header
from dobbin.reader import (READ_AHEAD, Damaged, Incomplete, checkpoint_without_header,
                           find_witness, read_record, reserved_head, zeros_from)

INCOMPLETE = "incomplete record"  # diagnose(): being written or torn, not damage


def _side_path(path, suffix):
    """`path`.`suffix`, its name shortened (keeping a digest of the whole
    path) where the file system would refuse a name that long."""
    directory, name = os.path.split(path)
    try:
        longest = os.pathconf(directory or ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    encoded = os.fsencode(name)
    if len(encoded) + 1 + len(suffix) > longest:
        digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16].encode()
        keep = max(0, longest - len(suffix) - len(digest) - 2)
        name = os.fsdecode(encoded[:keep] + b"~" + digest)
    return os.path.join(directory, "%s.%s" % (name, suffix))


class Recovery:
    """Reading the records with the write lock held, and cutting what is torn."""

    def recover(self, repair=False):
        """Yield every valid record after `self.end`, dealing with damage.

        Called with the write lock held.  A torn tail is cut back, its
        bytes saved beside the file.  Damage with a valid record after it
        raises `CorruptionError`, or with `repair` is cut away (saved too).
        After the last record, `self.dropped` tells what was cut.
        """
        self.dropped = None
        if not self.read_only:
            self.check_same_file()  # before anything is written
        while True:
            head = self._peek()
            if not head or (reserved_head(head) and self._reserved_space_here()):
                self._check_records_kept()  # the end: but of our records?
                return
            file_size = self.size()
            try:
                record = read_record(self.fd, self.end, self.last_tid + 1, file_size)
            except Incomplete:
                self._check_records_kept()
                # A sound header running past the end: the record was being
                # written; what lies after its header is its own payload.
                self._cut("torn", "an incomplete record at the end of what was durable")
                return
            except Damaged as damage:
                self._check_records_kept()
                if damage.skip_to is not None and self._sound_at(damage.skip_to, file_size):
                    self._skip(damage)  # a damaged checkpoint is only redundant
                    continue
                reason, where = damage.reason, damage.offset
                # Inside a record whose length we trust, record-like bytes
                # are payload (a stored backup of a Dobbin file, say).
                search_from = damage.span_end or self.end + 1
            else:
                self._advance(record)
                yield record
                continue
            witness = find_witness(self.fd, search_from, file_size, self.last_tid + 1,
                                   self.checkpoint, self.end)
            if witness is None:
                # Nothing later says this record was ever durable: a torn write.
                self._cut("torn", "%s at the end of what was durable" % reason)
            elif repair:
                self._cut("damaged", "damage at offset %d (%s)" % (where, reason))
            else:
                raise CorruptionError(
                    "damaged transaction record (%s); a valid record follows at offset %d and "
                    "says it was durable; open with repair=True to keep the %d transactions "
                    "before it" % (reason, witness, self.last_tid), self.path, where)
            return

    def _records_kept(self):
        """Is the last record this process read still where it read it?
        Not if another process cut the file below it (a repair), and others
        may have written since: writing or cutting at our end would then
        leave a hole, or destroy what they wrote."""
        if self._tail is None:
            return True
        offset, tid, stamp, seen = self._tail
        data = os.pread(self.fd, TX_HEADER_SIZE, offset)
        if data == seen:
            return True  # the bytes found there before: no need to parse them again
        header = parse_header(data) if len(data) == TX_HEADER_SIZE else None
        if header is None or (header.tid, header.time) != (tid, stamp):
            return False
        self._tail = (offset, tid, stamp, data)
        return True

    def _check_records_kept(self):
        """CorruptionError unless `_records_kept()`."""
        if not self._records_kept():
            raise CorruptionError(
                "the record of transaction %d that this process read is gone: another process "
                "cut the file (a repair?); open it again" % self._tail[1], self.path,
                self._tail[0])

    def diagnose(self):
        """Why the record at `end` can't be read (maybe INCOMPLETE), or None if it can."""
        try:
            read_record(self.fd, self.end, self.last_tid + 1, self.size())
        except Incomplete:
            return INCOMPLETE
        except Damaged as damage:
            # As recover() tells them: with no later record vouching for it,
            # it was never known durable (torn by a crash, or being written:
            # a staged file's record is zeros until its entries are).
            if checkpoint_without_header(self.fd, self.end) or find_witness(
                    self.fd, damage.span_end or self.end + 1, self.size(), self.last_tid + 1,
                    self.checkpoint, self.end) is None:
                return INCOMPLETE
            # A witness: unless a writer finished the record meanwhile.
            try:
                read_record(self.fd, self.end, self.last_tid + 1, self.size())
            except (Incomplete, Damaged):
                return "%s (at offset %d)" % (damage.reason, damage.offset)
        return None

    def _skip(self, damage):
        self.skipped.append((self.end, damage.reason))  # the checkpoint record's offset
        self.end = damage.skip_to

    def _sound_at(self, offset, file_size):
        """Is `offset` the end of the records (the file's end, or reserved
        space) or the start of a valid record?"""
        if offset == file_size or zeros_from(self.fd, offset, file_size):
            return True
        try:
            read_record(self.fd, offset, None, file_size)
        except (Incomplete, Damaged):
            return False
        return True

    def _cut(self, label, reason):
        if self.read_only:
            return  # leave it; a writer will deal with it
        saved = self._save_tail(label)
        try:
            self._truncate(self.end)
            self._exclusive_sync()
        except OSError as error:
            self.broken = error
            raise StorageError("cutting the torn tail of %s failed (%s); the database refuses "
                               "writes until reopened" % (self.path, error)) from error
        self.dropped = {"offset": self.end, "bytes": self.size_before_cut,
                        "saved_as": saved, "reason": reason}

    def _save_tail(self, label):
        """Copy the bytes after the records beside the file; return the copy's path.

        Raises StorageError (nothing cut yet) if the copy cannot be made.
        """
        self.size_before_cut = self.size() - self.end
        n = 0
        while True:
            saved = _side_path(self.path, "%s-%d-%d" % (label, self.last_tid, n))
            if not os.path.exists(saved):
                break
            n += 1
        try:
            with open(saved, "xb") as out:
                position = self.end
                while True:
                    chunk = os.pread(self.fd, READ_AHEAD, position)
                    if not chunk:
                        break
                    out.write(chunk)
                    position += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            self._fsync_directory()
        except OSError as error:
            raise StorageError("cannot save the %d bytes after the records of %s as %s (%s); "
                               "nothing was cut" % (self.size_before_cut, self.path, saved,
                                                    error)) from error
        return saved
