"""The byte layout of Dobbin records (see docs/format.txt).

The constants and structs of the file header, transaction records and
entries, the entries a writer appends, the tuples a reader gets back, and
`build_record`, which lays one record out.  No I/O here: `dobbin.log`
reads and writes.
"""

import json
import struct
from collections import namedtuple

# zlib's CRC-32, computed with carry-less multiply instructions where the
# CPU has them: about 90 GB/s here against zlib's 5, which bounded
# reading a stream (every chunk is checked as it is read).
from zlib_ng.zlib_ng import crc32

FILE_MAGIC = b"\x89DOBBIN\n"
#: The version new files get.  Version 1 files (before M entries) are
#: still read and appended to, as version 1: without M entries.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FILE_HEADER = struct.Struct("<8sHHI16sQ20sI")
FILE_HEADER_SIZE = FILE_HEADER.size  # 64

TX_MAGIC = b"DTXR"
TX_HEADER = struct.Struct("<4sc3sQQQQQII")
TX_HEADER_SIZE = TX_HEADER.size  # 56
TRAILER_MAGIC = b"DEND"
TRAILER = struct.Struct("<I4sQ")
TRAILER_SIZE = TRAILER.size  # 16
ENTRY = struct.Struct("<c3sIQQQQ")
ENTRY_SIZE = ENTRY.size  # 40

COMMITTED = b"C"
FAILED = b"F"
CHECKPOINT = b"X"
KIND_OBJECT = b"O"
KIND_STREAM = b"S"
KIND_ROOT = b"R"
KIND_NOTE = b"N"
KIND_INDEX = b"I"
KIND_META = b"M"
KINDS = frozenset((KIND_OBJECT, KIND_STREAM, KIND_ROOT, KIND_NOTE, KIND_INDEX, KIND_META))
KEPT_KINDS = (KIND_OBJECT, KIND_NOTE, KIND_INDEX, KIND_META)

STREAM_CHUNK = 65536
MAX_LAG = (1 << 24) - 1
_SMALL_PART = 1 << 16


# What one entry of a record read back from the file looks like.  `data`
# is kept for O, N, I and M entries (None for the others).
Entry = namedtuple("Entry", "kind oid tid previous offset length data")
Record = namedtuple("Record", "tid status offset length oid_high time checkpoint lag entries")


class Header(namedtuple("_Header", "status length tid oid_high time checkpoint lag count")):

    @property
    def vouched(self):
        """The last tid its writer knew durable when writing this record."""
        return self.tid - self.lag - (0 if self.status == CHECKPOINT else 1)


def parse_header(data):
    """The fields of a record header whose magic and crc are sound, or None."""
    (magic, status, lag, length, tid, oid_high, stamp, checkpoint, count,
     header_crc) = TX_HEADER.unpack(data)
    if magic != TX_MAGIC or header_crc != crc(data[:52]):
        return None
    return Header(status, length, tid, oid_high, stamp, checkpoint,
                   int.from_bytes(lag, "little"), count)


class ObjectEntry(namedtuple("ObjectEntry", "oid previous data")):
    """An object's full pickled state, to be appended."""

    kind = KIND_OBJECT


class StreamEntry(namedtuple("StreamEntry", "data")):
    """The bytes of a persistent stream, to be appended."""

    kind = KIND_STREAM


class RootEntry(namedtuple("RootEntry", "oid")):
    """A new root object, to be appended."""

    kind = KIND_ROOT


class NoteEntry(namedtuple("NoteEntry", "info")):
    """Why a commit failed (a JSON-able dict), for failed records."""

    kind = KIND_NOTE


class MetaEntry(namedtuple("MetaEntry", "data")):
    """A commit's transaction metadata (UTF-8 JSON bytes), for committed records."""

    kind = KIND_META


class IndexEntry(namedtuple("IndexEntry", "data")):
    """The serialized index, for checkpoint records."""

    kind = KIND_INDEX


def chunk_table(data):
    """The crc table of stream bytes `data`: a u32 per chunk of `STREAM_CHUNK`."""
    view = memoryview(data)
    return b"".join(struct.pack("<I", crc32(view[i:i + STREAM_CHUNK]))
                    for i in range(0, len(view), STREAM_CHUNK))


def stream_entry_size(size):
    """Bytes an S entry holding `size` stream bytes takes: header, data, crc table."""
    return ENTRY_SIZE + size + 4 * -(-size // STREAM_CHUNK)


def stream_size(length):
    """Bytes of stream data in an S entry whose data is `length` bytes."""
    chunks = -(-length // (STREAM_CHUNK + 4))
    return length - 4 * chunks


def crc(data, value=0):
    return crc32(data, value) & 0xFFFFFFFF


_ENTRY_HEAD = struct.Struct("<c3sI")
_ENTRY_TAIL = struct.Struct("<QQQQ")


def entry_header(kind, oid, tid, previous, length, checked):
    """The 40 bytes of an entry header, its crc over them and `checked` included."""
    tail = _ENTRY_TAIL.pack(oid, tid, previous, length)
    return _ENTRY_HEAD.pack(kind, b"\0\0\0", crc32(checked, crc32(tail))) + tail


class StagedStream:
    """A stream's bytes already copied to their place in the file (see
    "Stored files: staged first" in docs/format.txt): only their length
    and chunk crc table are left to lay out."""

    __slots__ = ("size", "table")

    def __init__(self, size, table):
        self.size = size
        self.table = table

    def __len__(self):
        return self.size


class StagedObjects:
    """O entries already written in place, back to back (a big snapshot's,
    see `dobbin.staging.stage_objects`): `size` bytes from `offset`,
    their entry headers joined (the trailer crc covers them), and each
    one's oid and data length, in order."""

    __slots__ = ("offset", "size", "headers", "oids", "lengths")

    def __init__(self, offset, size, headers, oids, lengths):
        self.offset = offset
        self.size = size
        self.headers = headers
        self.oids = oids
        self.lengths = lengths

    def __len__(self):
        return len(self.oids)

    def entries(self, tid):
        """Their `Entry`s as read back (without the data), made one at a time."""
        at = self.offset
        for oid, length in zip(self.oids, self.lengths):
            yield Entry(KIND_OBJECT, oid, tid, 0, at, length, None)
            at += ENTRY_SIZE + length


class LaidOutEntries:
    """A record's entries as read back, where runs of staged O entries are
    made only as they are iterated (a snapshot's millions of them)."""

    def __init__(self, parts, tid):
        self._parts = parts
        self._tid = tid

    def __iter__(self):
        for part in self._parts:
            if type(part) is StagedObjects:
                yield from part.entries(self._tid)
            else:
                yield part

    def __len__(self):
        return sum(len(part) if type(part) is StagedObjects else 1 for part in self._parts)


def record_header(status, lag, length, tid, oid_high, stamp, checkpoint, count):
    """The 56 bytes of a record header, its crc included."""
    head = TX_HEADER.pack(TX_MAGIC, status, lag.to_bytes(3, "little"), length, tid, oid_high,
                          stamp, checkpoint, count, 0)[:52]
    return head + struct.pack("<I", crc32(head))


def build_record(status, tid, oid_high, offset, checkpoint, lag, entries, stamp):
    """Lay out one record.

    Returns the segments to write, `(offset, buffers)` pairs in file
    order (small parts joined, large payloads kept as they are; the bytes
    of a `StagedStream` or `StagedObjects` are in place already, so the
    parts around them form separate segments), the record's length, and
    its entries as read back.
    """
    parts = [None]
    segments = [(offset, parts)]
    position = offset + TX_HEADER_SIZE
    entry_headers = []
    laid_out = []
    count = 0
    staged = False
    for entry in entries:
        if type(entry) is StagedObjects:
            staged = True
            entry_headers.append(entry.headers)
            laid_out.append(entry)
            count += len(entry)
            position += entry.size
            parts = []  # after the staged entries
            segments.append((position, parts))
            continue
        count += 1
        kind = entry.kind
        oid = previous = 0
        if kind == KIND_OBJECT:
            oid, previous, data = entry
            checked = data
        elif kind == KIND_STREAM:
            if type(entry.data) is StagedStream:
                raw, table = None, entry.data.table
            else:
                raw = memoryview(entry.data)
                table = chunk_table(raw)
            data = (raw, table)
            checked = table
        elif kind == KIND_ROOT:
            oid, data, checked = entry.oid, b"", b""
        elif kind == KIND_INDEX:
            # Prefixed with where it is written, so a copy elsewhere is known stale.
            data = checked = struct.pack("<Q", offset) + entry.data
        elif kind == KIND_META:
            data = checked = entry.data
        else:
            data = checked = json.dumps(entry.info, sort_keys=True).encode("utf-8")
        length = len(entry.data) + len(data[1]) if kind == KIND_STREAM else len(data)
        header = entry_header(kind, oid, tid, previous, length, checked)
        entry_headers.append(header)
        parts.append(header)
        if kind == KIND_STREAM and data[0] is None:
            parts = [data[1]]  # after the staged bytes
            segments.append((position + ENTRY_SIZE + len(entry.data), parts))
        elif kind == KIND_STREAM:
            parts.extend(data)
        else:
            parts.append(data)
        laid_out.append(Entry(kind, oid, tid, previous, position, length,
                              data if kind in KEPT_KINDS else None))
        position += ENTRY_SIZE + length
    length = position + TRAILER_SIZE - offset
    header = record_header(status, lag, length, tid, oid_high, stamp, checkpoint, count)
    segments[0][1][0] = header
    binding = crc32(b"".join(entry_headers), crc32(header))
    parts.append(TRAILER.pack(binding, TRAILER_MAGIC, length))
    if staged:
        laid_out = LaidOutEntries(laid_out, tid)
    return [(at, _coalesce(chunk)) for at, chunk in segments if chunk], length, laid_out


def header_last(segments):
    """Split the writes of `build_record` into (the rest, the record header).

    For checkpoints, which are written header last: one is large, so a
    writer killed while writing it can leave it half written, and reserved
    zeros after it.  Without its header that is an ordinary torn tail,
    which the next writer cuts; with a sound header it could only be
    stepped over (a damaged checkpoint may be one that a live reader has
    read past), and verify() would report it for ever.
    """
    (offset, buffers), later = segments[0], segments[1:]
    first = memoryview(buffers[0])
    body = [first[TX_HEADER_SIZE:]] + buffers[1:]
    return [(offset + TX_HEADER_SIZE, body)] + later, first[:TX_HEADER_SIZE]


def _coalesce(parts):
    """Join runs of small parts; keep large ones as separate buffers."""
    buffers, small = [], []
    for part in parts:
        if len(part) >= _SMALL_PART:
            if small:
                buffers.append(b"".join(small))
                small = []
            buffers.append(part)
        else:
            small.append(part)
    if small:
        buffers.append(b"".join(small))
    return buffers
