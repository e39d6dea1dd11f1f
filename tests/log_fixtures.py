"""Log files built record by record by the real writer, and damage forged
into copies of them: the helpers of tests/test_log.py and
tests/test_recovery.py."""

import os
import struct
import time
import zlib

from dobbin.log import (CHECKPOINT, COMMITTED, ENTRY_SIZE, TRAILER_SIZE, TX_HEADER_SIZE,
                        IndexEntry, Log, ObjectEntry)

# Field offsets, from docs/format.txt.
H_STATUS, H_LAG, H_LENGTH, H_TID, H_COUNT, H_CRC = 4, 5, 8, 16, 48, 52
E_CRC, E_TID, E_LENGTH = 4, 16, 32
T_CRC, T_MAGIC, T_LENGTH = 0, 4, 8


def crc(data, value=0):
    return zlib.crc32(data, value) & 0xFFFFFFFF


def object_entry(tid, size=10):
    return ObjectEntry(oid=tid, previous=0, data=bytes([tid % 251]) * size)


def records_of(tmp_path, *specs):
    """Append `(status, entries)` records to a scratch log; return their bytes.

    Each record is written by the real writer; tests then forge copies.
    """
    path = str(tmp_path / ("scratch-%d.dobbin" % time.monotonic_ns()))
    log = Log(path, durability="none")
    spans = []
    for status, entries in specs:
        record = log.append(status, 100, entries)
        spans.append((record.offset, record.offset + record.length))
    log.close()
    with open(path, "rb") as f:
        data = f.read()
    os.remove(path)
    return [bytearray(data[start:end]) for start, end in spans]


def commits(tmp_path, count, size=10):
    return records_of(tmp_path, *[(COMMITTED, [object_entry(tid, size)])
                                  for tid in range(1, count + 1)])


def make_file(path, records):
    """A fresh file holding `records` (bytes) after its header; their offsets."""
    if os.path.exists(path):
        os.remove(path)
    Log(path, durability="none").close()
    offsets = []
    with open(path, "ab") as f:
        for record in records:
            offsets.append(f.tell())
            f.write(record)
    return offsets


def entry_offsets(record):
    """Offsets of the entry headers inside `record`, as laid out."""
    count, = struct.unpack_from("<I", record, H_COUNT)
    offsets, position = [], TX_HEADER_SIZE
    for _ in range(count):
        offsets.append(position)
        length, = struct.unpack_from("<Q", record, position + E_LENGTH)
        position += ENTRY_SIZE + length
    return offsets


def seal(record, entries, header=True, trailer=True):
    """Make the header crc and the trailer crc right for the current bytes.

    `entries` are the entry header offsets the reader will walk (taken
    before a length was forged).
    """
    if header:
        struct.pack_into("<I", record, H_CRC, crc(bytes(record[:H_CRC])))
    if trailer:
        binding = crc(bytes(record[:TX_HEADER_SIZE]))
        for offset in entries:
            binding = crc(bytes(record[offset:offset + ENTRY_SIZE]), binding)
        struct.pack_into("<I", record, len(record) - TRAILER_SIZE + T_CRC, binding)


def seal_entry(record, offset, checked):
    """Make the crc of the entry at `offset` right for `checked` bytes."""
    struct.pack_into("<I", record, offset + E_CRC,
                     crc(checked, crc(bytes(record[offset + 8:offset + ENTRY_SIZE]))))


def set_lag(record, lag):
    record[H_LAG:H_LAG + 3] = lag.to_bytes(3, "little")
    seal(record, entry_offsets(record))


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def checkpoint_file(tmp_path, path):
    """Records 1-3, a checkpoint, records 4-5, through the real writer."""
    log = Log(path, durability="none")
    spans = []
    for tid in range(1, 6):
        record = log.append(COMMITTED, 100, [object_entry(tid)])
        spans.append((record.offset, record.offset + record.length))
        if tid == 3:
            record = log.append(CHECKPOINT, 100, [IndexEntry(b"index as of 3")])
            spans.append((record.offset, record.offset + record.length))
    log.close()
    return spans


def small_commits(log, count):
    return [log.append(COMMITTED, 100, [object_entry(tid)]) for tid in range(1, count + 1)]
