"""Object state records: the server's cache of them, and sealing them for broadcasts.

A state record is the encoded map {class, serial, state} that a load reply
carries as its result: the readable part of one version of one object.  The
server makes each record once and sends the same bytes in load replies, in
commit replies and, sealed, in broadcasts.

A broadcast goes to every subscriber, but a record may only be read by a
client that holds the object's key.  So each record in a broadcast is
sealed: XORed with a SHAKE-256 stream of the key's MAC (16 secret bytes
that only the key's holders know), the server instance and the tid.  A
subscriber without the key learns nothing but the record's length.  Sealing
gives secrecy from other clients, not integrity; the transport (CURVE) is
what protects messages on the way.
"""

import hashlib
import struct
import threading

SEAL_CONTEXT = b"dobbin-broker-seal-v1"
_NONCE = struct.Struct(">QQ")
# What an entry costs beyond its record's bytes (its dict slot, tuple, int
# and bytes headers), so that many small records stay within max_bytes.
ENTRY_OVERHEAD = 200


class Record:
    """An encoded state record, sent as is (the server splices it into replies)."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


def seal(mac, server, tid, record):
    """Return `record` (bytes) readable only with `mac`, for broadcast `tid` of `server`."""
    stream = hashlib.shake_256(SEAL_CONTEXT + mac + _NONCE.pack(server, tid)).digest(len(record))
    return (int.from_bytes(record, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        len(record), "little")


def unseal(mac, server, tid, sealed):
    """Return the record that seal(mac, server, tid, record) turned into `sealed`.

    With another MAC the result is noise, which the codec refuses or the
    client's shape check rejects.
    """
    return seal(mac, server, tid, sealed)


class StateCache:
    """The newest record of recently read or changed objects, as of transaction `top`.

    An entry (serial, record) for an oid says: among the transactions up to
    `top`, the newest that changed the oid is `serial`, and this is its
    record.  `changed` is called for every committed transaction, in tid
    order (the server's db.subscribe callback): it drops the entries of the
    oids the transaction changed before moving `top`, so an entry present
    is right for every snapshot in [serial, top].  Bounded by `max_bytes`
    (records and their bookkeeping);
    the oldest entries go first.  Thread-safe.
    """

    def __init__(self, top=0, max_bytes=32 * 1024 * 1024):
        self._lock = threading.Lock()
        self._entries = {}   # oid -> (serial, record bytes), oldest first
        self._bytes = 0
        self.top = top
        self.max_bytes = max_bytes

    def __len__(self):
        return len(self._entries)

    def get(self, oid, tid):
        """Return the record of `oid` as of snapshot `tid`, or None if not known."""
        with self._lock:
            entry = self._entries.get(oid)
            if entry is not None and entry[0] <= tid <= self.top:
                return entry[1]
        return None

    def changed(self, tid, oids, records=()):
        """Transaction `tid` changed `oids`; `records` maps some of them to their new record."""
        with self._lock:
            for oid in oids:
                self._drop(oid)
            if tid > self.top:
                self.top = tid
            for oid, record in records.items() if records else ():
                self._put(oid, tid, record)

    def put(self, oid, serial, record, as_of):
        """Remember `record` as the newest version of `oid` among transactions up to `as_of`.

        Ignored unless `as_of` is still `top` (a transaction learned since
        then may have changed the oid).
        """
        with self._lock:
            if as_of == self.top:
                self._put(oid, serial, record)

    def _put(self, oid, serial, record):
        self._drop(oid)
        self._entries[oid] = (serial, record)
        self._bytes += len(record) + ENTRY_OVERHEAD
        if self._bytes > self.max_bytes:
            for old in list(self._entries)[:max(1, len(self._entries) // 4)]:
                self._drop(old)

    def _drop(self, oid):
        entry = self._entries.pop(oid, None)
        if entry is not None:
            self._bytes -= len(entry[1]) + ENTRY_OVERHEAD
