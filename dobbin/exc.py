"""Exceptions raised by the Dobbin store.

Every error the store raises on purpose derives from `DobbinError`, so an
application can tell our refusals apart from bugs.  Each carries the facts
a person needs to act on it (which oid, which offset, which file).
"""

from transaction.interfaces import TransientError


class DobbinError(Exception):
    """Base class of every error raised on purpose by Dobbin."""


class ConflictError(DobbinError, TransientError):
    """A commit lost a race with another commit of the same object.

    It is transient: `transaction.manager.attempts()` retries it.
    """

    def __init__(self, message=None, oid=None, class_name=None, serials=None):
        self.oid = oid
        self.class_name = class_name
        self.serials = serials
        if message is None:
            message = "database conflict"
            if oid is not None:
                message += " on oid %d" % oid
            if class_name is not None:
                message += " (%s)" % class_name
            if serials is not None:
                message += " (checked out at transaction %d, now at %d)" % serials
        super().__init__(message)


class WriteConflictError(ConflictError):
    """The object was changed by a commit this database already knew of."""


class ReadConflictError(ConflictError):
    """The object was changed by a commit found while catching up."""


class ObjectGraphError(DobbinError):
    """A checked-out object is not reachable from the database root.

    `obj` is that object, when one is known.
    """

    def __init__(self, message, obj=None):
        super().__init__(message)
        self.obj = obj


class CorruptionError(DobbinError):
    """The file holds damaged or impossible bytes.

    `path` and `offset` say where; damaged bytes are never returned as data.
    """

    def __init__(self, message, path=None, offset=None):
        self.path = path
        self.offset = offset
        where = ""
        if path is not None or offset is not None:
            where = " (%s at offset %s)" % (path, offset)
        super().__init__(message + where)


class DamagedHistoryError(CorruptionError):
    """Walking back through the history met damage.  `found` holds the
    sound transactions after it that were found, newest first (what a
    caller such as a restarting broker may still use)."""

    def __init__(self, message, path=None, offset=None, found=()):
        super().__init__(message, path, offset)
        self.found = list(found)


class LockTimeoutError(DobbinError):
    """The database file's write lock could not be had in time."""


class StorageError(DobbinError):
    """An I/O error made the database refuse further writes."""


class ReadOnlyError(DobbinError):
    """A write was attempted on a database opened read-only, or closed."""


class HistoryError(DobbinError, KeyError):
    """The requested version of an object does not exist in the log."""

    def __str__(self):
        return str(self.args[0]) if self.args else "no such version"


class StreamError(DobbinError):
    """A persistent stream was used the wrong way (closed, or spent)."""


class LoadError(DobbinError):
    """A record passed its checksum but could not be unpickled."""


class InvalidTypeError(DobbinError, TypeError):
    """An argument or value of a type Dobbin does not take there (a
    `cache_size` that is not an int, a root that is not persistent...).
    A TypeError too, as Python's own refusals are."""


class InvalidValueError(DobbinError, ValueError):
    """An argument of the right type but a value Dobbin does not take (a
    negative tid, an unknown durability, a seek before the start, no key
    in range...).  A ValueError too, as Python's own refusals are."""


class UnstorableError(DobbinError, TypeError):
    """A state holds a value that cannot be pickled (a lambda, a class
    defined inside a function, an open file...); the commit fails."""


class BrokenObjectError(DobbinError):
    """An object whose class could not be imported was to be changed (see
    `dobbin.broken`): restore the class under its old name first."""
