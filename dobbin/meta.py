"""Transaction metadata: what a commit records of its transaction.

A committed record may carry one M entry (see docs/format.txt): the
`transaction`'s ``user``, ``description`` and ``extension``, as ZODB
keeps them, so that tools can tell who changed what and why.  The broker
uses the extension to recognise a commit it already ran before a restart.

Only what is set is written; a transaction with none of the three adds
no entry.  Values are JSON: a stored persistent object of the database
is recorded as its oid, one stored by another database of the
transaction as {"database": its path, "oid": its oid} (one the commit
leaves unconnected fails it with `ObjectGraphError`), a tuple as a list,
and anything else JSON can't hold fails the commit too, before anything
is written, as do an extension that is not a dict, a dict key that is not
text, and an extension value nested deeper than MAX_NESTING.
"""

import json
from collections import namedtuple

from dobbin.exc import (CorruptionError, DamagedHistoryError, DobbinError, InvalidTypeError,
                        InvalidValueError, ObjectGraphError)
from dobbin.persistent import Persistent
from dobbin.record import COMMITTED, KIND_META, MetaEntry
from dobbin.session import named

#: The first format version with M entries.
META_VERSION = 2
#: How deep containers may nest in each value of a transaction's extension.
MAX_NESTING = 100
#: How far back `recent_transactions` reads.
RECENT_BYTES = 64 << 20

#: What `Database.recent_transactions` returns, one per committed record;
#: `time` is in seconds since the epoch.
TransactionInfo = namedtuple("TransactionInfo", "tid time user description extension")


def meta_entry(txn, jar, version):
    """The M entry recording `txn`'s metadata in `jar`'s log (of format
    `version`), or None if it has none or the format has no M entries.

    Called once the new objects of every database in the transaction have
    their oids.
    """
    if version < META_VERSION:
        return None
    info = {}
    for name in ("user", "description"):
        value = getattr(txn, name, "")
        if value:
            if not isinstance(value, str):
                raise DobbinError("the transaction's %s must be text, not %r" % (name, value))
            info[name] = value
    extension = getattr(txn, "extension", None)
    if extension:
        if not isinstance(extension, dict):
            raise DobbinError("the transaction's extension must be a dict, not a %s"
                              % type(extension).__name__)
        _check_extension(extension, MAX_NESTING + 1)
        info["extension"] = extension
    if not info:
        return None

    def stored_oid(value):
        if isinstance(value, Persistent):
            if value._p_jar is None or value._p_oid is None:
                raise ObjectGraphError("%s not connected to graph." % named(value), value)
            if value._p_jar is jar:
                return value._p_oid
            # Stored by another database of the same transaction.
            return {"database": value._p_jar.path, "oid": value._p_oid}
        raise InvalidTypeError("%r is not JSON" % (value,))

    try:
        data = json.dumps(info, default=stored_oid, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as error:
        raise DobbinError("the transaction's metadata cannot be recorded: %s" % error) from None
    return MetaEntry(data.encode("utf-8"))


def _check_extension(value, levels):
    """Refuse containers nested more than `levels` deep in `value` (reading
    the record back must not depend on how deep the reader's stack is),
    and dict keys that are not text: JSON would turn 1 into "1", silently,
    and one of {1: ..., "1": ...} would be lost."""
    if isinstance(value, (dict, list, tuple)):
        if not levels:
            raise DobbinError("the transaction's metadata cannot be recorded: nested deeper "
                              "than %d levels" % MAX_NESTING)
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise DobbinError("the transaction's metadata cannot be recorded: a key "
                                      "that is not text (%r)" % (key,))
            value = value.values()
        for item in value:
            _check_extension(item, levels - 1)


def transaction_info(record, path):
    """The `TransactionInfo` of a committed `record` of the log at `path`."""
    info = {}
    for entry in record.entries:
        if entry.kind == KIND_META:
            try:
                info = json.loads(entry.data.decode("utf-8"))
            except (ValueError, RecursionError) as error:  # UnicodeDecodeError too
                raise CorruptionError("metadata entry is not UTF-8 JSON: %s" % error,
                                      path, entry.offset) from None
            if not isinstance(info, dict):
                raise CorruptionError("metadata entry is not a JSON object", path, entry.offset)
    return TransactionInfo(record.tid, record.time / 1e9, info.get("user", ""),
                           info.get("description", ""), info.get("extension", {}))


def recent_transactions(log, limit):
    """The `TransactionInfo` of the latest `limit` committed records of `log`, newest first."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise InvalidValueError("limit is a number of transactions (an int >= 0), not %r"
                                % (limit,))
    found = []
    try:
        for record in log.records_before(log.end, RECENT_BYTES):
            if len(found) == limit:
                break
            if record.status == COMMITTED:
                found.append(transaction_info(record, log.path))
    except DamagedHistoryError as error:
        error.found = found
        raise
    return found
