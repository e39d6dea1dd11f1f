"""Reading a record back and checking every byte of it.

`read_record` parses the record at an offset and checks what
docs/format.txt promises: header crc, sane length, tid sequence, every
entry's crc and stream chunk crcs, the trailer.  It raises `Incomplete`
when the file ends inside the record and `Damaged` when a check fails;
the log (`dobbin.recovery`) decides whether that is a commit still being
written, a torn write or corruption.  The searches it decides with are
here too: where the records end (before reserved space), the last sound
record header, the newest checkpoint, and a later record that vouches
for a damaged one; and the checked reading of one object or stream
entry by its offset.
"""

import os
import struct

from dobbin.exc import CorruptionError

from dobbin.record import (CHECKPOINT, COMMITTED, ENTRY, ENTRY_SIZE, FAILED, FILE_HEADER_SIZE,
                           KEPT_KINDS, KINDS, KIND_INDEX, KIND_META, KIND_OBJECT, KIND_ROOT,
                           KIND_STREAM, STREAM_CHUNK, TRAILER, TRAILER_MAGIC, TRAILER_SIZE,
                           TX_HEADER, TX_HEADER_SIZE, TX_MAGIC, Entry, Record, parse_header,
                           stream_size)
from dobbin.record import crc as _crc

READ_AHEAD = 1 << 20
# Where a record would start, these bytes mean reserved space: the records
# end here (see "Reserved space after the records" in docs/format.txt).
ZERO_HEADER = bytes(TX_HEADER_SIZE)
_ZERO_BLOCK = bytes(64 * 1024)
_PAGE = 4096
# No file system holds a file this large: a length beyond it is damage.
_MAX_RECORD = 1 << 50


class Damaged(Exception):
    """A record failed a check; `dobbin.recovery` decides what that means.

    `skip_to` is set for a checkpoint whose header is sound: being
    redundant, it can be stepped over.
    """

    def __init__(self, reason, offset, skip_to=None):
        super().__init__(reason)
        self.reason = reason
        self.offset = offset
        self.skip_to = skip_to
        self.span_end = None  # set when the header (so the length) is sound


class Incomplete(Exception):
    """The file ends inside a record (a commit in progress or torn)."""


class SequentialReader:
    """Sequential reads of one file region, with read-ahead."""

    def __init__(self, fd, start, end):
        self.fd = fd
        self.pos = start
        self.end = end
        self._buffer = b""
        self._buffer_start = start

    def read(self, size):
        if self.pos + size > self.end:
            raise Incomplete()
        offset = self.pos - self._buffer_start
        if offset + size <= len(self._buffer):
            data = self._buffer[offset:offset + size]
        elif size >= READ_AHEAD:
            data = pread_exact(self.fd, size, self.pos)
        else:
            want = min(max(size, READ_AHEAD), self.end - self.pos)
            self._buffer = pread_exact(self.fd, want, self.pos)
            self._buffer_start = self.pos
            data = self._buffer[:size]
        self.pos += size
        return data


def pread_exact(fd, size, offset):
    data = os.pread(fd, size, offset)
    if len(data) != size:
        # The file shrank under us (another process cut a torn tail).
        raise Incomplete()
    return data


# -- the end of the records --------------------------------------------------

def zeros_from(fd, start, file_size):
    """Are the bytes from `start` to `file_size` all zero (reserved space)?"""
    position = start
    while position < file_size:
        block = os.pread(fd, min(len(_ZERO_BLOCK), file_size - position), position)
        if not block:
            break  # the file shrank: nothing there at all
        if block != _ZERO_BLOCK[:len(block)]:
            return False
        position += len(block)
    return True


def records_end(fd, file_size):
    """Where the records seem to end: before the zero bytes of reserved space.

    The last record's trailer ends in the zero high bytes of its length,
    so its ``DEND`` is looked for just before the last non-zero byte.
    """
    position = file_size
    while position > FILE_HEADER_SIZE:
        start = max(FILE_HEADER_SIZE, position - len(_ZERO_BLOCK))
        block = os.pread(fd, position - start, start)
        last = _last_non_zero(block)
        if last:
            return _trailer_end(fd, start + last, file_size)
        position = start
    return FILE_HEADER_SIZE


def _trailer_end(fd, last, file_size):
    """The end of the trailer whose length's zero high bytes follow the
    non-zero byte before `last`, or `last` if none does (a torn tail)."""
    window_start = max(FILE_HEADER_SIZE, last - 12)
    window = os.pread(fd, last - window_start, window_start)
    found = window.rfind(TRAILER_MAGIC)
    while found >= 0:
        # A length whose bytes spell "END" after the magic's "D" makes a
        # second "DEND"; the true one is followed by a plausible length.
        length = int.from_bytes(window[found + 4:found + 12], "little")
        end = window_start + found + 12
        if TX_HEADER_SIZE + TRAILER_SIZE <= length <= end - FILE_HEADER_SIZE:
            return min(file_size, end)
        found = window.rfind(TRAILER_MAGIC, 0, found + len(TRAILER_MAGIC) - 1)
    return last


def _last_non_zero(block):
    """One past the last non-zero byte of `block`, or 0 if it is all zero."""
    end = len(block)
    while end > 0:
        start = max(0, end - _PAGE)
        page = block[start:end]
        if page != _ZERO_BLOCK[:len(page)]:  # pages compare whole, fast; strip only one
            return start + len(page.rstrip(b"\0"))
        end = start
    return 0


def record_start_before(fd, end):
    """Where the record whose trailer ends at `end` starts, as that trailer
    says (its magic and a possible length checked, nothing more), or None."""
    if end - TRAILER_SIZE < FILE_HEADER_SIZE:
        return None
    trailer = os.pread(fd, TRAILER_SIZE, end - TRAILER_SIZE)
    if len(trailer) < TRAILER_SIZE:
        return None
    _binding, magic, length = TRAILER.unpack(trailer)
    start = end - length
    if (magic != TRAILER_MAGIC or length < TX_HEADER_SIZE + TRAILER_SIZE
            or start < FILE_HEADER_SIZE):
        return None
    return start


def find_last_header(fd, file_size):
    """(offset, status, checkpoint) of the last sound record header, or None.

    Reads the trailer just before `file_size`; if that is not a clean
    record end (a torn tail), searches back for a record magic.
    """
    position = file_size
    while position > FILE_HEADER_SIZE:
        start = record_start_before(fd, position)
        if start is not None:
            header = _sound_header(fd, start)
            if header is not None and header.length == position - start:
                return start, header.status, header.checkpoint
        start = max(FILE_HEADER_SIZE, position - READ_AHEAD)
        chunk = os.pread(fd, position - start, start)
        index = chunk.rfind(TX_MAGIC)
        while index >= 0:
            header = _sound_header(fd, start + index)
            if header is not None and start + index + header.length <= file_size:
                return start + index, header.status, header.checkpoint
            index = chunk.rfind(TX_MAGIC, 0, index)
        position = start + 3 if start > FILE_HEADER_SIZE else FILE_HEADER_SIZE
    return None


def reserved_head(head):
    """Do the bytes read where a record would start (a header's worth, or
    fewer at the end of the file) begin reserved space: zeros only?  A
    record may fill the reserve up to a few bytes short of its end."""
    return head.count(0) == len(head)


def checkpoint_without_header(fd, offset):
    """Is a checkpoint being written at `offset`: no header yet (zeros),
    its I entry after it, whose index starts with `offset`, as every one
    does?  (Checkpoints are written header last, see docs/format.txt.)"""
    block = os.pread(fd, TX_HEADER_SIZE + ENTRY_SIZE + 8, offset)
    return (block[:TX_HEADER_SIZE] == ZERO_HEADER
            and _checkpoint_entry(block[TX_HEADER_SIZE:], offset) is not None)


def _checkpoint_entry(head, offset):
    """The fields of the I entry whose header (and the 8 bytes after it)
    `head` holds, if it is the one of a checkpoint at `offset`: its index
    starts with that offset, as every one does.  Else None."""
    if (len(head) < ENTRY_SIZE + 8 or head[:1] != KIND_INDEX
            or int.from_bytes(head[ENTRY_SIZE:ENTRY_SIZE + 8], "little") != offset):
        return None
    return ENTRY.unpack_from(head)


def _sound_header(fd, offset):
    header = os.pread(fd, TX_HEADER_SIZE, offset)
    if len(header) < TX_HEADER_SIZE:
        return None
    return parse_header(header)


def newest_checkpoint(fd, file_size):
    """The newest sound checkpoint record, its index entry's data without
    its offset prefix, or None (then the caller replays from the start).

    Reads the last record's header (found from the end of the file,
    stepping back over reserved space and a torn tail) for the
    checkpoint's offset, then the checkpoint.
    """
    last = find_last_header(fd, records_end(fd, file_size))
    if last is None:
        return None
    offset, status, checkpoint = last
    if status == CHECKPOINT:
        checkpoint = offset
    if not checkpoint:
        return None
    try:
        record = read_record(fd, checkpoint, None, file_size)
    except (Incomplete, Damaged):
        return None
    if record.status != CHECKPOINT or record.lag:
        return None  # a checkpoint is only written once all before it is durable
    data = record.entries[0].data if len(record.entries) == 1 else None
    if (type(data) is not bytes or record.entries[0].kind != KIND_INDEX
            or data[:8] != struct.pack("<Q", record.offset)):
        return None  # a stale copy of a checkpoint, found where it was not written
    return record._replace(entries=[record.entries[0]._replace(data=data[8:])])


def find_witness(fd, start, file_size, damaged_tid, checkpoint, damaged_at):
    """The offset of a valid record after `start` that vouches for the
    damaged record of `damaged_tid` (which starts at `damaged_at`), or None.

    A record's lag says how many records before it its writer did not
    yet know to be durable (see docs/format.txt).  If a valid later
    record vouches for the damaged one, the damage happened to durable
    bytes: corruption.  If none does, the damaged record was never
    known durable: a write torn by a crash.  Headers are checked in the
    buffer first, so the search stays linear in the file's size.
    `checkpoint` is the newest checkpoint before the damage.
    """
    foreign = set()
    position = start
    while position < file_size:
        chunk = os.pread(fd, READ_AHEAD + TX_HEADER_SIZE, position)
        index = chunk.find(TX_MAGIC)
        while 0 <= index <= len(chunk) - TX_HEADER_SIZE:
            header = parse_header(chunk[index:index + TX_HEADER_SIZE])
            # A successor: a later tid that vouches for the damaged one,
            # and a checkpoint pointer no older than the last one before it.
            if (header is not None and header.tid >= damaged_tid
                    and header.vouched >= damaged_tid
                    and checkpoint <= header.checkpoint < position + index):
                try:
                    read_record(fd, position + index, None, file_size)
                except (Incomplete, Damaged):
                    pass
                else:
                    if _ours(fd, position + index, header, damaged_tid, damaged_at, foreign):
                        return position + index
            index = chunk.find(TX_MAGIC, index + 1)
        position += READ_AHEAD
    return None


def _ours(fd, offset, header, damaged_tid, damaged_at, foreign):
    """Does the record at `offset` follow the damaged one in this file?

    Walked back through the trailers, the records after the damage lead
    down to it with tids of at least `damaged_tid` (the damaged record's
    if it was a transaction; if it was a checkpoint, which repeats the
    tid before it, the next one's), checkpoints one less.  The records
    of a Dobbin file stored as a payload inside the damaged record lead
    down to their own first tid instead: they vouch for nothing here.
    Offsets of such chains go in `foreign`, so that each is walked once.
    """
    walked = []
    while True:
        if offset in foreign or header.tid < damaged_tid - (header.status == CHECKPOINT):
            foreign.update(walked)
            return False
        walked.append(offset)
        if offset - TRAILER_SIZE < damaged_at + TX_HEADER_SIZE:
            return True
        _crc, magic, length = TRAILER.unpack(os.pread(fd, TRAILER_SIZE, offset - TRAILER_SIZE))
        before = offset - length
        if magic != TRAILER_MAGIC or not damaged_at < before < offset:
            return True  # the damaged record's trailer, or no trailer: the chain ends
        earlier = parse_header(os.pread(fd, TX_HEADER_SIZE, before))
        if earlier is None or earlier.length != length or earlier.tid > header.tid:
            return True
        offset, header = before, earlier


# -- one record ----------------------------------------------------------------

def read_record(fd, offset, expected_tid, file_size):
    """Read and check the record at `offset`; raise Incomplete/Damaged.

    A Damaged checkpoint has `skip_to` set if it can be stepped over: its
    header is sound, or its header is damaged (or missing) but its body
    is whole and a valid record follows it."""
    try:
        header, fields = _read_header(fd, offset, expected_tid, file_size)
    except Damaged as damage:
        end = _checkpoint_end_past_header(fd, offset, expected_tid, file_size)
        if end is not None:
            damage.skip_to = damage.span_end = end
        raise
    status, length = fields[0], fields[1]
    try:
        return _read_body(fd, offset, header, *fields)
    except Damaged as damage:
        damage.span_end = offset + length
        if status == CHECKPOINT:
            damage.skip_to = offset + length
        raise


def skim_record(fd, offset, file_size):
    """The record at `offset` with only its M entry, read and checked
    (with the record's framing: its header, its entries' headers and its
    trailer) without reading the other entries' data: the metadata of a
    record too big to read whole.  Raises Incomplete/Damaged."""
    header, fields = _read_header(fd, offset, None, file_size)
    status, length, tid, oid_high, stamp, checkpoint, lag, count = fields
    position, end = offset + TX_HEADER_SIZE, offset + length - TRAILER_SIZE
    binding = _crc(header)
    entries = []
    for _ in range(count):
        if position + ENTRY_SIZE > end:
            raise Damaged("entries overrun the record", offset)
        entry_header = pread_exact(fd, ENTRY_SIZE, position)
        binding = _crc(entry_header, binding)
        kind, _res, crc, oid, entry_tid, previous, entry_length = ENTRY.unpack(entry_header)
        if kind not in KINDS or entry_tid != tid:
            raise Damaged("entry of kind %r, transaction %d, in record %d"
                          % (kind, entry_tid, tid), position)
        if position + ENTRY_SIZE + entry_length > end:
            raise Damaged("entry length %d overruns its record" % entry_length, position)
        if kind == KIND_META:
            data = pread_exact(fd, entry_length, position + ENTRY_SIZE)
            if crc != _crc(data, _crc(entry_header[8:])):
                raise Damaged("entry checksum mismatch", position)
            entries.append(Entry(kind, oid, entry_tid, previous, position, entry_length, data))
        position += ENTRY_SIZE + entry_length
    if position != end:
        raise Damaged("entries do not fill the record", offset)
    _check_trailer(fd, offset, end, length, binding)
    return Record(tid, status, offset, length, oid_high, stamp, checkpoint, lag, entries)


def records_before(fd, end, file_size, max_bytes):
    """Yield the records that end at or before `end`, newest first,
    walking back by their trailers, until `max_bytes` are read.

    A record bigger than what is left of `max_bytes` (a stored file) is
    skimmed: it comes with its M entry only, and costs only what was read
    of it.  A damaged checkpoint is stepped over (it is only redundant);
    any other record that fails a check, or a trailer that does not lead
    to one, raises `Damaged` once the sound records after it are yielded.
    """
    while max_bytes > 0 and end > FILE_HEADER_SIZE:
        start = record_start_before(fd, end)
        if start is None:
            raise Damaged("no sound record trailer ends at offset %d" % end,
                          max(FILE_HEADER_SIZE, end - TRAILER_SIZE))
        try:
            if end - start <= max_bytes:
                record = read_record(fd, start, None, file_size)
                max_bytes -= end - start
            else:
                record = skim_record(fd, start, file_size)
                max_bytes -= (TX_HEADER_SIZE + TRAILER_SIZE + ENTRY_SIZE * len(record.entries)
                              + sum(entry.length for entry in record.entries))
        except Damaged as damage:
            if damage.skip_to != end:
                raise
            end = start  # a damaged checkpoint; verify reports it
            continue
        except Incomplete:
            raise Damaged("the record the trailer at offset %d points to runs past the end"
                          % (end - TRAILER_SIZE), start) from None
        yield record
        end = start


def _read_header(fd, offset, expected_tid, file_size):
    """(header bytes, (status, length, tid, oid high, time, checkpoint,
    lag, count)) of the sound record header at `offset`."""
    if offset + TX_HEADER_SIZE > file_size:
        raise Incomplete()
    header = os.pread(fd, TX_HEADER_SIZE, offset)
    if len(header) < TX_HEADER_SIZE:
        raise Incomplete()
    (magic, status, lag, length, tid, oid_high, stamp, checkpoint, count,
     header_crc) = TX_HEADER.unpack(header)
    lag = int.from_bytes(lag, "little")
    if magic != TX_MAGIC:
        raise Damaged("bad record magic %r" % magic, offset)
    if header_crc != _crc(header[:52]):
        raise Damaged("record header checksum mismatch", offset)
    if status not in (COMMITTED, FAILED, CHECKPOINT):
        raise Damaged("unknown record status %r" % status, offset)
    if length < TX_HEADER_SIZE + TRAILER_SIZE + count * ENTRY_SIZE:
        raise Damaged("record length %d too small for %d entries" % (length, count), offset)
    if length > _MAX_RECORD:
        raise Damaged("record length %d is impossible" % length, offset)
    if expected_tid is not None:
        if status == CHECKPOINT:
            expected_tid -= 1
        if tid != expected_tid:
            # Checked before the length is believed: a stale header from
            # an older file layout has a plausible length but not our tid.
            raise Damaged("transaction id %d out of sequence (expected %d)"
                           % (tid, expected_tid), offset)
    if offset + length > file_size:
        raise Incomplete()
    return header, (status, length, tid, oid_high, stamp, checkpoint, lag, count)


def _checkpoint_end_past_header(fd, offset, expected_tid, file_size):
    """The end of the checkpoint at `offset` whose header is unreadable,
    or None if that is not what is there.

    Its header is written last and covers nothing a later record needs
    (docs/format.txt), so a lost or damaged one costs nothing when the
    body is whole: one I entry of the tid before `expected_tid` (a
    checkpoint repeats it), with a sound crc, whose index starts with
    `offset`, then a trailer of the record's length, then a valid record.
    Without that later record it is what a writer left half written:
    the tail is torn, and not stepped over.
    """
    head = os.pread(fd, ENTRY_SIZE + 8, offset + TX_HEADER_SIZE)
    entry = _checkpoint_entry(head, offset)
    if entry is None:
        return None
    _kind, _res, crc, _oid, tid, _previous, length = entry
    end = offset + TX_HEADER_SIZE + ENTRY_SIZE + length + TRAILER_SIZE
    if expected_tid is not None and tid != expected_tid - 1 or end > file_size:
        return None
    binding = _crc(head[8:ENTRY_SIZE])
    position, data_end = offset + TX_HEADER_SIZE + ENTRY_SIZE, end - TRAILER_SIZE
    while position < data_end:
        chunk = os.pread(fd, min(READ_AHEAD, data_end - position), position)
        if not chunk:
            return None
        binding = _crc(chunk, binding)
        position += len(chunk)
    _trailer_crc, magic, record_length = TRAILER.unpack(
        os.pread(fd, TRAILER_SIZE, data_end).ljust(TRAILER_SIZE, b"\0"))
    if binding != crc or magic != TRAILER_MAGIC or record_length != end - offset:
        return None
    try:
        header, fields = _read_header(fd, end, tid + 1, file_size)
        _read_body(fd, end, header, *fields)
    except (Damaged, Incomplete):
        return None
    return end


def _check_trailer(fd, offset, end, length, binding):
    trailer = pread_exact(fd, TRAILER_SIZE, end)
    trailer_crc, trailer_magic, trailer_length = TRAILER.unpack(trailer)
    if trailer_magic != TRAILER_MAGIC or trailer_length != length:
        raise Damaged("bad record trailer", offset)
    if trailer_crc != binding:
        raise Damaged("record checksum mismatch", offset)

def _read_body(fd, offset, header, status, length, tid, oid_high, stamp, checkpoint, lag,
               count):
    reader = SequentialReader(fd, offset + TX_HEADER_SIZE, offset + length - TRAILER_SIZE)
    binding = _crc(header)
    entries = []
    try:
        for _ in range(count):
            entry_offset = reader.pos
            entry_header = reader.read(ENTRY_SIZE)
            binding = _crc(entry_header, binding)
            entry = _read_entry(fd, reader, entry_offset, entry_header)
            if entry.tid != tid:
                raise Damaged("entry of transaction %d in record %d" % (entry.tid, tid),
                               entry_offset)
            if entry.kind in (KIND_OBJECT, KIND_ROOT) and entry.oid >= oid_high:
                # Trusted, it would hand this oid out again.
                raise Damaged("oid %d not below the record's oid high %d"
                              % (entry.oid, oid_high), entry_offset)
            entries.append(entry)
    except Incomplete:
        raise Damaged("entries overrun the record", offset) from None
    if reader.pos != reader.end:
        raise Damaged("entries do not fill the record", offset)
    _check_trailer(fd, offset, reader.end, length, binding)
    return Record(tid, status, offset, length, oid_high, stamp, checkpoint, lag, entries)

def _read_entry(fd, reader, entry_offset, entry_header):
    kind, _res, crc, oid, tid, previous, length = ENTRY.unpack(entry_header)
    if kind not in KINDS:
        raise Damaged("unknown entry kind %r" % kind, entry_offset)
    if entry_offset + ENTRY_SIZE + length > reader.end:
        raise Damaged("entry length %d overruns its record" % length, entry_offset)
    data = None
    if kind == KIND_STREAM:
        n = stream_size(length)
        if n < 0 or length - n != 4 * -(-n // STREAM_CHUNK):
            raise Damaged("stream entry length %d fits no stream" % length, entry_offset)
        table_offset = reader.pos + n
        table = pread_exact(fd, length - n, table_offset)
        if crc != _crc(table, _crc(entry_header[8:])):
            raise Damaged("stream entry checksum mismatch", entry_offset)
        for index, (chunk_crc,) in enumerate(struct.iter_unpack("<I", table)):
            chunk = reader.read(min(STREAM_CHUNK, n - index * STREAM_CHUNK))
            if _crc(chunk) != chunk_crc:
                raise Damaged("stream chunk %d checksum mismatch" % index, entry_offset)
        reader.read(length - n)
    else:
        data = reader.read(length)
        if crc != _crc(data, _crc(entry_header[8:])):
            raise Damaged("entry checksum mismatch", entry_offset)
        if kind not in KEPT_KINDS:
            data = None
    return Entry(kind, oid, tid, previous, entry_offset, length, data)


# -- one entry, by offset (random access) ----------------------------------------

def check_entry_offset(offset, end, path):
    """Refuse an entry offset (read from a record: a previous version, a
    stream reference, an index) that is not inside the records."""
    if not FILE_HEADER_SIZE <= offset <= end - ENTRY_SIZE:
        raise CorruptionError("entry offset %d is outside the records (which end at %d)"
                              % (offset, end), path, None)


def object_entry_in(fd, block, at, offset, oid, end, path):
    """Check and take apart the O entry at `offset` of the log `path` whose
    records end at `end`; `block` holds it from index `at` on (its data may
    run past the block's end).  Returns `(tid, previous, data)`."""
    if len(block) < at + ENTRY_SIZE:
        raise CorruptionError("object entry beyond the end of the file", path, offset)
    kind, _res, crc, entry_oid, tid, previous, length = ENTRY.unpack_from(block, at)
    if kind != KIND_OBJECT or (oid is not None and entry_oid != oid):
        raise CorruptionError("expected the object entry of oid %s, found kind %r oid %d"
                              % (oid, kind, entry_oid), path, offset)
    if offset + ENTRY_SIZE + length > end:
        raise CorruptionError("object entry length %d overruns the log" % length, path, offset)
    begin = at + ENTRY_SIZE
    if begin + length <= len(block):
        data = block[begin:begin + length]
    else:
        data = os.pread(fd, length, offset + ENTRY_SIZE)
    if len(data) != length or crc != _crc(data, _crc(block[at + 8:begin])):
        raise CorruptionError("object entry checksum mismatch (oid %d)" % entry_oid, path, offset)
    return tid, previous, data


def stream_entry_at(fd, offset, end, path):
    """Check the S entry at `offset`; return `(size, chunk_crcs)`."""
    check_entry_offset(offset, end, path)
    header = os.pread(fd, ENTRY_SIZE, offset)
    if len(header) < ENTRY_SIZE:
        raise CorruptionError("stream entry beyond the end of the file", path, offset)
    kind, _res, crc, _oid, _tid, _prev, length = ENTRY.unpack(header)
    if kind != KIND_STREAM or offset + ENTRY_SIZE + length > end:
        raise CorruptionError("no stream entry here", path, offset)
    n = stream_size(length)
    if n < 0 or length - n != 4 * -(-n // STREAM_CHUNK):
        raise CorruptionError("stream entry length %d fits no stream" % length, path, offset)
    table = os.pread(fd, length - n, offset + ENTRY_SIZE + n)
    if len(table) != length - n or crc != _crc(table, _crc(header[8:])):
        raise CorruptionError("stream entry checksum mismatch", path, offset)
    return n, [value for (value,) in struct.iter_unpack("<I", table)]
