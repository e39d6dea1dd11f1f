"""Exceptions raised by the Dobbin broker.

Every error the broker raises on purpose derives from `BrokerError`.  Errors
raised on the server travel to the client as a type name and a message (never
a traceback unless the server runs with ``debug=True``) and are raised there
again by `from_wire`: the names in `WIRE_TYPES` become their own class, the
builtin `KeyError` and `AttributeError` become `RemoteKeyError` and
`RemoteAttributeError` (so both ``except KeyError`` and ``except RemoteError``
work), and anything else becomes a plain `RemoteError`.
"""

from transaction.interfaces import TransientError


class BrokerError(Exception):
    """Base class of every error raised on purpose by the broker."""

    def info(self):
        """Return the facts to send along with this error (a dict of plain values)."""
        return {}


class ProtocolError(BrokerError):
    """A message broke the wire protocol (docs/protocol.txt).

    Raised on the server for a malformed request (the reply carries it back)
    and on the client for a malformed reply.
    """


class EncodeError(ProtocolError):
    """A value cannot be sent: unsupported type, too deep, or too large."""


class DecodeError(ProtocolError):
    """Received bytes are not a valid message: bad msgpack, limits exceeded."""


class AccessDenied(BrokerError):
    """A key failed its MAC check, or the request reaches something not exported."""


class ConflictError(BrokerError, TransientError):
    """A commit was refused because a value the client read has changed.

    `key` names the object (its printable form) and `field` the attribute or
    mapping item whose current value differs from the one the client read.
    The client has rolled back its local changes when it raises this.
    It is transient: begin() again and redo the work.
    """

    def __init__(self, message=None, key=None, field=None):
        self.key = key
        self.field = field
        if message is None:
            message = "conflict"
            if key is not None:
                message += " on %s" % key
            if field is not None:
                message += " field %r" % (field,)
        super().__init__(message)

    def info(self):
        return {"key": self.key, "field": self.field}


class ReadConflictError(ConflictError):
    """The version of an object the client's snapshot needs is no longer kept.

    Begin a new transaction (client.begin()) to read the current version.
    """


class Busy(BrokerError, TransientError):
    """The server has too many requests waiting and refused this one, which
    did not run: send it again later (transient)."""


class ResultLost(BrokerError):
    """A call or invoke ran and committed, but its return value cannot
    reach the client: its server stopped before replying, and the server
    that got the client's copy knows only that it ran; or the value
    cannot be sent (too big, or not encodable).  It is not run again."""


class InvalidTypeError(BrokerError, TypeError):
    """An argument of a type the client does not take there (a search
    target that is neither a mapping proxy nor a class name...).  A
    TypeError too, as Python's own refusals are."""


class InvalidValueError(BrokerError, ValueError):
    """An argument or use the client does not take (reading a closed
    stream proxy...).  A ValueError too, as Python's own refusals are."""


class AddressError(BrokerError):
    """An address is not an endpoint ZeroMQ can bind or connect to
    (malformed, of an unknown transport, already in use)."""


class CurveKeyError(BrokerError, ValueError):
    """A CURVE key is not 32 bytes or 40 characters of Z85, or ZeroMQ refused it."""


class SecretFileError(BrokerError):
    """The server's secret file is missing, unreadable, damaged or too open."""


class ExportError(BrokerError):
    """The server's export configuration is inconsistent (a server-side bug)."""


class NoResultError(BrokerError, LookupError):
    """A search `get` matched nothing."""


class MultipleResultsError(BrokerError, LookupError):
    """A search `get` matched more than one object."""


class BrokerTimeout(BrokerError):
    """The server did not answer after every retry (see BrokerClient(retries=))."""


class ClientClosed(BrokerError):
    """The client was used after close()."""


class StaleProxyError(BrokerError):
    """A proxy of an object this client created in a transaction that
    ended (aborted, or failed to commit) without storing it."""


class RemoteError(BrokerError):
    """An error raised on the server that has no class of its own here.

    `type_name` is the server-side class name, `message` its text and
    `remote_traceback` the server's traceback text (only when the server runs
    with debug on, else None).
    """

    def __init__(self, type_name, message, remote_traceback=None):
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__("%s: %s" % (type_name, message))


class RemoteKeyError(RemoteError, KeyError):
    """A KeyError raised on the server."""

    def __str__(self):
        return "%s: %s" % (self.type_name, self.message)


class RemoteAttributeError(RemoteError, AttributeError):
    """An AttributeError raised on the server."""


# Broker errors that keep their own class across the wire, by name.
WIRE_TYPES = {
    cls.__name__: cls
    for cls in (
        ProtocolError, EncodeError, DecodeError, AccessDenied, ConflictError,
        ReadConflictError, NoResultError, MultipleResultsError, ExportError, ResultLost, Busy,
    )
}


def to_wire(error, traceback_text=None):
    """Return the wire form of `error`: a dict for the reply's "error" field."""
    if isinstance(error, ConflictError):
        type_name = type(error).__name__ if type(error).__name__ in WIRE_TYPES \
            else ConflictError.__name__
    elif isinstance(error, BrokerError) and type(error).__name__ in WIRE_TYPES:
        type_name = type(error).__name__
    elif isinstance(error, KeyError):
        type_name = "KeyError"
    elif isinstance(error, AttributeError):
        type_name = "AttributeError"
    else:
        type_name = type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1:
        message = repr(error.args[0])
    else:
        message = str(error)
    # A request's own values end up in errors (a missing item, a field):
    # bounded, so that a huge one cannot make the reply unencodable.
    wire = {"type": type_name, "message": _bounded(message)}
    info = error.info() if isinstance(error, BrokerError) else {}
    if info:
        wire["info"] = {name: value if _small(value) else _bounded(repr(value))
                        for name, value in info.items()}
    if traceback_text is not None:
        wire["traceback"] = traceback_text
    return wire


MAX_ERROR_TEXT = 1000


def _bounded(text):
    if len(text) <= MAX_ERROR_TEXT:
        return text
    return text[:MAX_ERROR_TEXT] + "... (%d characters)" % len(text)


def _small(value):
    """True for the info values sent as they are: None, numbers, short text."""
    if value is None or type(value) in (bool, int, float):
        return True
    return type(value) in (str, bytes) and len(value) <= MAX_ERROR_TEXT


def from_wire(wire):
    """Return the exception to raise on the client for a reply's "error" dict.

    `wire` has been validated by broker.protocol (type and message are str).
    """
    type_name = wire["type"]
    message = wire["message"]
    info = wire.get("info") or {}
    remote_tb = wire.get("traceback")
    cls = WIRE_TYPES.get(type_name)
    if cls is not None and issubclass(cls, ConflictError):
        error = cls(message, key=info.get("key"), field=info.get("field"))
    elif cls is not None:
        error = cls(message)
    elif type_name == "KeyError":
        error = RemoteKeyError(type_name, message, remote_tb)
    elif type_name == "AttributeError":
        error = RemoteAttributeError(type_name, message, remote_tb)
    else:
        error = RemoteError(type_name, message, remote_tb)
    if remote_tb is not None:
        error.remote_traceback = remote_tb
    return error
