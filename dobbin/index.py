"""The index: where each object's latest state lies, and the roots.

Built from record headers as the log is read (never by unpickling), and
saved whole in checkpoint records so that opening needs no replay.
"""

import bisect
import operator
import struct
from array import array

from dobbin.exc import CorruptionError, InvalidTypeError

_tid_of = operator.itemgetter(0)

# Oids are handed out densely, so the index is an array; an oid far past
# its end (only a hostile file has one) goes to a dict instead of making
# us allocate gigabytes.
_DENSE_SLACK = 1 << 24


def check_oid(oid):
    """Raise TypeError unless `oid` is an int (a bool is not an oid)."""
    if type(oid) is not int and (not isinstance(oid, int) or isinstance(oid, bool)):
        raise InvalidTypeError("an oid is an int, not %r" % type(oid).__name__)


class Index:
    """oid -> offset of the object's latest O entry, and the root changes."""

    def __init__(self):
        self._offsets = array("Q")
        self._sparse = {}
        self.roots = []          # (tid, oid) of every root change, oldest first
        self.count = 0           # objects with a stored state

    def offset_of(self, oid):
        """Offset of the latest state of `oid`, or 0 if it has none."""
        if 0 <= oid < len(self._offsets):  # a negative index would count from the end
            return self._offsets[oid]
        check_oid(oid)
        return self._sparse.get(oid, 0)

    def set_offset(self, oid, offset):
        offsets = self._offsets
        if len(offsets) <= oid < len(offsets) + _DENSE_SLACK:
            grow = max(oid + 1 - len(offsets), len(offsets) // 2, 1024)
            offsets.frombytes(bytes(8 * grow))
        if oid < len(offsets):
            if not offsets[oid]:
                self.count += 1
            offsets[oid] = offset
        else:
            if oid not in self._sparse:
                self.count += 1
            self._sparse[oid] = offset

    def oids(self):
        """Every oid with a stored state, in order."""
        offsets = self._offsets
        for oid in range(len(offsets)):
            if offsets[oid]:
                yield oid
        yield from sorted(self._sparse)

    def root_oid(self, tid=None):
        """The root's oid as of transaction `tid` (default: now), or None."""
        # `roots` is in tid order: a search, not a scan of every election.
        at = len(self.roots) if tid is None else bisect.bisect_right(self.roots, tid,
                                                                   key=_tid_of)
        return self.roots[at - 1][1] if at else None

    def size(self, oid_high):
        """Roughly the bytes of a checkpoint of this index."""
        return 8 * min(len(self._offsets), oid_high) + 16 * (len(self._sparse) + len(self.roots))

    def payload(self, oid_high):
        """The index as a checkpoint's I entry (layout in docs/format.txt)."""
        dense = self._offsets[:min(len(self._offsets), oid_high)]
        sparse = sorted(self._sparse.items())
        parts = [struct.pack("<QQQ", self.count, len(self.roots), len(dense)), dense.tobytes(),
                 struct.pack("<Q", len(sparse))]
        parts.extend(struct.pack("<QQ", oid, offset) for oid, offset in sparse)
        parts.extend(struct.pack("<QQ", tid, oid) for tid, oid in self.roots)
        return b"".join(parts)

    @classmethod
    def from_payload(cls, data, path, where):
        """The index a checkpoint holds; CorruptionError if it is malformed."""
        try:
            count, roots, dense = struct.unpack_from("<QQQ", data, 0)
            position = 24 + 8 * dense
            if position + 8 > len(data):
                raise struct.error("dense part overruns the entry")
            offsets = array("Q")
            offsets.frombytes(data[24:position])
            (sparse,) = struct.unpack_from("<Q", data, position)
            position += 8
            if position + 16 * (sparse + roots) != len(data):
                raise struct.error("size does not match the counts")
            pairs = list(struct.iter_unpack("<QQ", data[position:]))
        except struct.error as error:
            raise CorruptionError("malformed index checkpoint (%s)" % error, path,
                                  where) from None
        index = cls()
        index._offsets = offsets
        index._sparse = dict(pairs[:sparse])
        index.roots = pairs[sparse:]
        index.count = count
        return index
