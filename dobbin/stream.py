"""Persistent files and streams.

A `PersistentFile` wraps an open file for a single commit; its bytes
(from the file's position at wrapping time to its end) are written into
the transaction record.  A seekable binary file is copied into the log
block by block while the commit is prepared (a `FileSpan`; see "Stored
files: staged first" in docs/format.txt), so it may be larger than
memory; anything else is read whole.  So is a stream of another
database (or of the snapshot source) stored here: a `StreamSpan` copies
it chunk by checked chunk.  After the commit the very same
object becomes a `PersistentStream`, which reads those bytes back from
the log, chunk by checked chunk.  Streams live inside the state of the
object that refers to them; they are not objects with an oid of their own.
"""

import io
import threading
import weakref

from zope.interface import implementer

from dobbin.exc import ConflictError, InvalidTypeError, InvalidValueError, StreamError
from dobbin.interfaces import IPersistentFile, IPersistentStream
from dobbin.log import STREAM_CHUNK

# Bytes read from a stored file at a time: whole chunks, so that each
# block's chunk crcs are its own.
BLOCK = 16 * STREAM_CHUNK
# Smaller files are read whole: staging one costs a sync.
STAGE_MIN = BLOCK
# Guards which commit turns a PersistentFile into its stream (see
# PersistentFile._p_claim), and that turning.
_claims_lock = threading.Lock()


class FileSpan:
    """`size` bytes of a seekable binary file from `start`, read in blocks."""

    def __init__(self, source, start, size):
        self.source = source
        self.start = start
        self.size = size

    def __len__(self):
        return self.size

    def blocks(self, buffers=1):
        """Yield the bytes in blocks of `BLOCK` through `buffers` buffers
        reused in turn (so each block must be used before the `buffers`-th
        next one is asked for)."""
        pool = [memoryview(bytearray(min(BLOCK, self.size))) for _ in range(buffers)]
        remaining = self.size
        try:
            self.source.seek(self.start)
            turn = 0
            while remaining:
                block = pool[turn % buffers][:min(BLOCK, remaining)]
                turn += 1
                filled = 0
                while filled < len(block):
                    got = self.source.readinto(block[filled:])
                    if not got:
                        raise StreamError("the file being stored ended %d bytes short of the "
                                          "%d it had when the commit began"
                                          % (remaining - filled, self.size))
                    filled += got
                yield block
                remaining -= len(block)
        except (OSError, ValueError) as error:  # ValueError: the file was closed
            raise StreamError("reading the file being stored failed: %s" % error) from error


class StreamSpan:
    """The bytes of a `PersistentStream` of another database, read chunk
    by chunk (each checked against its crc) to be staged here."""

    def __init__(self, stream):
        self.stream = stream
        self.size = stream.size

    def __len__(self):
        return self.size

    def blocks(self, buffers=1):
        """Yield the bytes chunk by chunk, each a whole chunk (the last may
        be shorter) in bytes of its own (whatever `buffers` says), through
        the stream's own handle: its file view is untouched."""
        try:
            yield from self.stream
        except OSError as error:
            # The other database's file failed, not ours: the commit fails,
            # our log goes on (staging takes an OSError for its own).
            raise StreamError("reading the stream being copied failed: %s" % error) from error


def copy_source(stream):
    """What to store for `stream`, a stream of another database: a
    `StreamSpan` to stage, or the bytes when it is small."""
    if stream.size >= STAGE_MIN:
        return StreamSpan(stream)
    return b"".join(stream)


@implementer(IPersistentFile)
class PersistentFile:
    """A single-use wrapper that stores an open file's remaining bytes."""

    def __init__(self, stream):
        if not hasattr(stream, "read"):
            raise InvalidTypeError("PersistentFile wraps an object with a read() method, not %r"
                                   % type(stream).__name__)
        self._source = stream
        self._data = None
        self._start = _span_start(stream)
        self._p_laid_out_by = _no_commit  # weakref to the Commit that turns it into its stream

    def _p_source(self):
        """What to store: a `FileSpan` of a seekable binary file of a block or
        more, from where it was when wrapped to its end now (read at every
        commit attempt), else the bytes, read once so that a retried commit
        stores the same (files under `STAGE_MIN` too: staging costs a sync)."""
        if self._start is not None:
            try:
                self._source.seek(0, io.SEEK_END)
                size = max(0, self._source.tell() - self._start)
                self._source.seek(self._start)
            except (OSError, ValueError) as error:
                raise StreamError("the file to store cannot be read: %s" % error) from error
            if size >= STAGE_MIN:
                return FileSpan(self._source, self._start, size)
            self._start = None
        if self._data is None:
            try:
                data = self._source.read()
            except (OSError, ValueError) as error:  # io.UnsupportedOperation too
                raise StreamError("the file to store cannot be read: %s" % error) from error
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not isinstance(data, (bytes, bytearray)):
                raise InvalidTypeError("the wrapped file's read() returned %r, not bytes"
                                       % type(data).__name__)
            self._data = bytes(data)
            self._source = None
        return self._data

    def _p_claim(self, commit):
        """Does `commit` store the file itself, which becomes its stream
        when it is published?  Not if another database's commit in the
        same transaction does (this one stores a copy), nor if a commit
        turned it into its stream already.

        ConflictError while another thread's commit stores it: the two
        would read one file position at once (wrong bytes, with good
        checksums).  Retried, the commit stores a copy of that stream.
        """
        with _claims_lock:
            if self.__class__ is not PersistentFile:
                return False
            other = self._p_laid_out_by()
            if (other is not None and other is not commit and other.locked
                    and not other.published):
                if other.transaction is not commit.transaction:
                    raise ConflictError("a PersistentFile being stored by another thread's "
                                        "commit was stored by this one too: retry it to "
                                        "store a copy of the stream it becomes")
                return False
            self._p_laid_out_by = weakref.ref(commit)
            return True

    def _p_become_stream(self, jar, offset, size):
        # Same identity, new class: the object now reads from the log.
        with _claims_lock:
            self.__class__ = PersistentStream
            self.__dict__.clear()
            self._p_attach(jar, offset, size)

    def __deepcopy__(self, memo):
        return self


def _no_commit():
    return None


def _span_start(stream):
    """The position of a seekable binary file that has `readinto`, else None."""
    if isinstance(stream, io.TextIOBase) or not hasattr(stream, "readinto"):
        return None
    try:
        return stream.tell() if stream.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


def seek_position(offset, whence, position, size):
    """The position `seek(offset, whence)` moves to from `position`, as
    `io.IOBase.seek` computes it; `size()` gives the stream's size."""
    if type(offset) is not int:
        raise InvalidTypeError("a seek offset is an int, not %r" % (offset,))
    if whence == io.SEEK_SET:
        new = offset
    elif whence == io.SEEK_CUR:
        new = position + offset
    elif whence == io.SEEK_END:
        new = size() + offset
    else:
        raise InvalidValueError("invalid whence (%r, should be 0, 1 or 2)" % (whence,))
    if new < 0:
        raise InvalidValueError("negative seek position %d" % new)
    return new


@implementer(IPersistentStream)
class PersistentStream:
    """Bytes stored in the log, read through a file-like API or iteration.

    The file-like methods (`open`, `read`, `seek`, `tell`, `close`) share
    one position per stream object; `read_at` and iteration keep their own,
    so they are independent of them and safe to use from several threads.
    """

    # Its public home, as the user's guide shows it, is dobbin.database.
    __module__ = "dobbin.database"

    def __init__(self, jar, offset, size=None):
        self._p_attach(jar, offset, size)

    def _p_attach(self, jar, offset, size):
        self._jar = jar
        self._offset = offset
        self._size = size
        self._crcs = None
        self._position = None

    def _p_info(self):
        if self._crcs is None:
            self._size, self._crcs = self._jar._log.open_stream(self._offset)
        return self._size, self._crcs

    @property
    def size(self):
        """Number of bytes in the stream."""
        return self._p_info()[0]

    def _chunk(self, index):
        size, crcs = self._p_info()
        return self._jar._log.read_stream_chunk(self._offset, crcs, size, index)

    # -- file-like API -------------------------------------------------

    def open(self):
        """Open the stream for reading at its start."""
        self._p_info()
        self._position = 0

    @property
    def closed(self):
        return self._position is None

    def _check_open(self):
        if self._position is None:
            raise StreamError("the stream is closed; call open() first")

    def read(self, size=-1):
        """Read up to `size` bytes (all that remain if negative)."""
        self._check_open()
        data = self.read_at(self._position, -1 if size is None else size)
        self._position += len(data)
        return data

    def read_at(self, offset, size=-1):
        """Read up to `size` bytes from `offset` (all that remain if negative),
        leaving the position alone: safe from several threads at once."""
        if type(offset) is not int or type(size) is not int:
            raise InvalidTypeError("offset and size are ints, not %r and %r" % (offset, size))
        if offset < 0:
            raise InvalidValueError("negative offset %d" % offset)
        total = self.size
        end = total if size < 0 else min(total, offset + size)
        parts = []
        while offset < end:
            index, skip = divmod(offset, STREAM_CHUNK)
            chunk = self._chunk(index)[skip:skip + end - offset]
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts)

    def seek(self, offset, whence=io.SEEK_SET):
        """Move the position, as `io.IOBase.seek` does (never past the end);
        return it."""
        self._check_open()
        self._position = min(seek_position(offset, whence, self._position, lambda: self.size),
                             self.size)
        return self._position

    def tell(self):
        """The current position."""
        self._check_open()
        return self._position

    def close(self):
        """Close the file-like view; iteration is unaffected."""
        self._position = None

    def __iter__(self):
        size, crcs = self._p_info()
        return self._jar._log.stream_chunks(self._offset, crcs, size)

    def __deepcopy__(self, memo):
        return self
