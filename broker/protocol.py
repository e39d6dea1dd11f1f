"""The broker's message schema and the validation of every incoming message.

docs/protocol.txt is the prose version of this module; the tables here are
what the code enforces.  Frames:

    request   client DEALER -> server ROUTER:  [b"", MAGIC, body]
    reply     server ROUTER -> client DEALER:  [b"", MAGIC, body]
    broadcast server PUB -> client SUB:        [TOPIC, body]

Each body is one codec-encoded map (broker.codec).  A request map holds
"id" (the client's request number), "op" and the op's fields, exactly those
in REQUESTS (a missing or unknown field is an error).  A reply map holds
"id" (the request's, or None when the request had none), "srv" (the
server's instance number) and either "ok" (the result) or "error".
"""

from broker.exc import ProtocolError
from broker.keys import Key

MAGIC = b"DOB1"
TOPIC = b"inv"
VERSION = 2
MAX_ID = 2 ** 63 - 1
MAX_NAME = 256
MAX_CHUNK = 1024 * 1024
MAX_LIMIT = 100000


# -- field validators: each returns the value or raises ProtocolError -------

def _fail(op, field, what, value):
    raise ProtocolError("%s: field %r must be %s, got %s"
                        % (op, field, what, _describe(value)))


def _describe(value):
    if isinstance(value, (int, float, bool)) or value is None:
        return repr(value)
    return type(value).__name__


def uint(op, field, value):
    if type(value) is not int or not 0 <= value <= MAX_ID:
        _fail(op, field, "an int >= 0", value)
    return value


def opt_uint(op, field, value):
    return None if value is None else uint(op, field, value)


def limit(op, field, value):
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= MAX_LIMIT:
        _fail(op, field, "None or an int in 1..%d" % MAX_LIMIT, value)
    return value


def chunk(op, field, value):
    if type(value) is not int or not 1 <= value <= MAX_CHUNK:
        _fail(op, field, "an int in 1..%d" % MAX_CHUNK, value)
    return value


def text(op, field, value):
    if type(value) is not str or len(value) > MAX_NAME:
        _fail(op, field, "a str of at most %d characters" % MAX_NAME, value)
    return value


def name(op, field, value):
    if type(value) is not str or not value.isidentifier() or value.startswith("_") \
            or len(value) > MAX_NAME:
        _fail(op, field, "a public identifier", value)
    return value


def key(op, field, value):
    if type(value) is not Key or value.kind == "n":
        _fail(op, field, "an object key", value)
    return value


def target(op, field, value):
    if type(value) is Key and value.kind in "os":
        return value
    if type(value) is str and 0 < len(value) <= MAX_NAME:
        return value
    _fail(op, field, "an object key or a class name", value)


def stream_key(op, field, value):
    if type(value) is not Key or value.kind != "f":
        _fail(op, field, "a stream key", value)
    return value


def path(op, field, value):
    if type(value) is not list or not 1 <= len(value) <= 16 or not all(
            (type(p) is str and len(p) <= MAX_NAME) or type(p) is int for p in value):
        _fail(op, field, "a list of 1..16 str or int", value)
    return tuple(value)


def token(op, field, value):
    if type(value) is not bytes or len(value) != 16:
        _fail(op, field, "16 bytes", value)
    return value


def mode(op, field, value):
    if value not in ("get", "find", "count"):
        _fail(op, field, "'get', 'find' or 'count'", value)
    return value


def any_value(op, field, value):
    return value


def args(op, field, value):
    if type(value) is not list:
        _fail(op, field, "a list", value)
    return value


def _identifier_map(description):
    """Validator for a map whose keys are Python identifiers."""
    def validate(op, field, value):
        if type(value) is not dict or not all(type(k) is str and k.isidentifier()
                                              for k in value):
            _fail(op, field, description, value)
        return value
    return validate


kwargs = _identifier_map("a map of identifiers to values")
fields_map = _identifier_map("a map of attribute names to values")


def query(op, field, value):
    if type(value) is not dict or not all(
            type(k) is str and k.isidentifier() and not k.startswith("_") for k in value):
        _fail(op, field, "a map of public field names to values", value)
    return value


def _rows(width, *checks):
    """Validator for a list of fixed-width rows, checking columns with `checks`."""
    def validate(op, field, value):
        if type(value) is not list:
            _fail(op, field, "a list", value)
        for i, row in enumerate(value):
            if type(row) is not list or len(row) != width:
                _fail(op, "%s[%d]" % (field, i), "a list of %d items" % width, row)
            for column, check in enumerate(checks):
                check(op, "%s[%d][%d]" % (field, i, column), row[column])
        return value
    return validate


def new_key(op, field, value):
    if type(value) is not Key:
        _fail(op, field, "an object key", value)
    return value


def new_number(op, field, value):
    return uint(op, field, value)


# -- requests ----------------------------------------------------------------

# op -> {field: validator}.  Every field is required.  "id" and "op" are
# checked for every request and not repeated here.
REQUESTS = {
    "hello": {},
    "ping": {},
    "sync": {"since": opt_uint},
    "load": {"key": key, "tx": uint},
    "meta": {"class": text},
    "static": {"path": path},
    "item": {"key": key, "tx": uint, "item": any_value},
    "items": {"key": key, "tx": uint, "start": uint, "limit": limit},
    "commit": {
        "tx": uint, "since": opt_uint, "token": token,
        # [temporary number, class name, {field: value}]
        "new": _rows(3, new_number, text, fields_map),
        # [key, attribute, old value or ABSENT, new value]
        "set": _rows(4, new_key, name, any_value, any_value),
        # [key, attribute, old value]
        "del": _rows(3, new_key, name, any_value),
        # [mapping key, item, old value or ABSENT, new value]
        "setitem": _rows(4, new_key, any_value, any_value, any_value),
        # [mapping key, item, old value]
        "delitem": _rows(3, new_key, any_value, any_value),
    },
    "call": {"name": name, "args": args, "kwargs": kwargs, "token": token},
    "invoke": {"key": key, "tx": uint, "method": name, "args": args, "kwargs": kwargs,
               "token": token},
    "search": {"target": target, "tx": uint, "mode": mode, "query": query, "limit": limit},
    "stream": {"key": stream_key, "tx": uint, "offset": uint, "size": chunk},
}

# Requests the server answers from its front thread (cheap reads); the
# others go to the worker pool.
INLINE = frozenset({"hello", "ping", "sync", "load", "meta", "static", "item"})

# Of those, the ones answered from what the server holds, whose replies a
# client busy-waits for (broker.transport.SPIN).  Not sync: it waits for
# commits being published, and a client spinning meanwhile slows them.
QUICK = INLINE - {"sync"}

# Requests that may write: the server runs one per (token, id), however
# often the client sends it (broker.outcomes).
ONCE = frozenset({"commit", "call", "invoke"})


def request_id(body):
    """Return the request's id if it has a valid one, else None (for error replies)."""
    if type(body) is dict:
        value = body.get("id")
        if type(value) is int and 0 <= value <= MAX_ID:
            return value
    return None


def check_request(body):
    """Validate a decoded request body; return (id, op, fields) or raise ProtocolError."""
    if type(body) is not dict:
        raise ProtocolError("a request must be a map, got %s" % _describe(body))
    rid = body.get("id")
    if type(rid) is not int or not 0 <= rid <= MAX_ID:
        raise ProtocolError("request: field 'id' must be an int >= 0, got %s" % _describe(rid))
    op = body.get("op")
    schema = REQUESTS.get(op) if type(op) is str else None
    if schema is None:
        shown = repr(op)[:60] if type(op) is str else _describe(op)
        raise ProtocolError("unknown request op %s" % shown)
    fields = {}
    for field, validate in schema.items():
        if field not in body:
            raise ProtocolError("%s: missing field %r" % (op, field))
        fields[field] = validate(op, field, body[field])
    if len(body) != len(fields) + 2:  # every field of the schema is there, plus id and op
        extra = set(body) - set(schema) - {"id", "op"}
        raise ProtocolError("%s: unknown field(s) %s"
                            % (op, ", ".join(sorted(repr(e)[:40] for e in extra))))
    return rid, op, fields


def split_request(frames):
    """Split a ROUTER message into (routing id, body bytes) or raise ProtocolError.

    The routing id is always returned first so an error can be answered:
    raises ProtocolError with attribute `routing` set.
    """
    routing = frames[0]
    if len(frames) != 4 or frames[1] != b"" or frames[2] != MAGIC:
        error = ProtocolError(
            "expected frames [b'', %r, body] after the routing id, got %d frame(s)%s"
            % (MAGIC, len(frames) - 1,
               "" if len(frames) < 3 or frames[2] == MAGIC else " with a wrong magic"))
        error.routing = routing
        raise error
    return routing, frames[3]


# -- replies -------------------------------------------------------------------

def ok_reply(rid, server, result):
    """Return the map of a successful reply."""
    return {"id": rid, "srv": server, "ok": result}


def error_reply(rid, server, error_wire):
    """Return the map of an error reply; `error_wire` comes from broker.exc.to_wire."""
    return {"id": rid, "srv": server, "error": error_wire}


def check_reply(body):
    """Validate a decoded reply map; return (id, server, ok, result_or_error_wire)."""
    if type(body) is not dict or "srv" not in body or "id" not in body:
        raise ProtocolError("malformed reply")
    rid, server = body["id"], body["srv"]
    if (rid is not None and type(rid) is not int) or type(server) is not int:
        raise ProtocolError("malformed reply header")
    if "ok" in body and len(body) == 3:
        return rid, server, True, body["ok"]
    error = body.get("error")
    if (len(body) == 3 and type(error) is dict and type(error.get("type")) is str
            and type(error.get("message")) is str
            and set(error) <= {"type", "message", "info", "traceback"}
            and type(error.get("info", {})) is dict
            and type(error.get("traceback", "")) is str):
        return rid, server, False, error
    raise ProtocolError("malformed reply")


# Result shapes the client checks: op -> predicate.
def _is_map_with(*names):
    names = frozenset(names)
    return lambda v: type(v) is dict and names.issubset(v)


_SYNC = _is_map_with("tid", "changed", "root")
_LOAD = _is_map_with("class", "serial", "state")
_COMMIT = _is_map_with("tid", "created", "changed", "states")
_ITEMS = _is_map_with("items", "more", "len")
_STREAM = _is_map_with("data", "size")
_ITEM = _is_map_with("value", "deps")

REPLIES = {
    "hello": _is_map_with("version", "broadcast", "tid", "root", "server"),
    "sync": lambda v: (_SYNC(v) and type(v["tid"]) is int
                       and (v["changed"] is None or type(v["changed"]) is list)
                       and type(v.get("seq", 0)) is int),  # seq: absent from old servers
    "load": lambda v: (_LOAD(v) and type(v["state"]) is dict and type(v["class"]) is str),
    "meta": _is_map_with("name", "fields", "writable", "callables", "mapping"),
    "items": lambda v: _ITEMS(v) and type(v["items"]) is list,
    "commit": lambda v: (_COMMIT(v)
                         and type(v["tid"]) is int and type(v["created"]) is list
                         and type(v["states"]) is list),
    "search": _is_map_with("result", "deps"),
    "stream": lambda v: _STREAM(v) and type(v["data"]) is bytes,
    "item": lambda v: _ITEM(v) and type(v["value"]) is list and len(v["value"]) <= 1,
}


def check_result(op, result):
    """Raise ProtocolError unless `result` has the shape op's reply must have."""
    check = REPLIES.get(op)
    if check is not None and not check(result):
        raise ProtocolError("malformed %s reply" % op)
    return result


# -- broadcasts ----------------------------------------------------------------

def invalidation(server, seq, tid, prev, oids, states=()):
    """Return the map of a broadcast for committed transaction `tid`.

    `prev` is the tid of the previous committed transaction this server
    broadcast (or knew of when it started); a client whose last known tid is
    not `prev` has missed something and flushes.  `seq` numbers every
    broadcast of this server instance (1, 2, 3, ...).  `states` is a list of
    [oid, sealed record] for some of `oids` (broker.states).
    """
    return {"srv": server, "seq": seq, "tid": tid, "prev": prev, "oids": oids,
            "states": list(states)}


def static_invalidation(server, seq, paths):
    """Return the map of a broadcast that static objects at `paths` changed."""
    return {"srv": server, "seq": seq, "tid": None, "prev": None, "statics": paths}


def check_broadcast(body):
    """Validate a decoded broadcast map; raise ProtocolError if malformed."""
    if type(body) is not dict or type(body.get("srv")) is not int \
            or type(body.get("seq")) is not int:
        raise ProtocolError("malformed broadcast")
    if body.get("tid") is None:
        paths = body.get("statics")
        if type(paths) is not list or not all(type(p) is list for p in paths):
            raise ProtocolError("malformed static broadcast")
    elif (type(body["tid"]) is not int or type(body.get("prev")) is not int
          or type(body.get("oids")) is not list):
        raise ProtocolError("malformed invalidation broadcast")
    else:
        states = body.get("states", [])   # optional: absent means none
        if type(states) is not list or not all(
                type(row) is list and len(row) == 2 and type(row[0]) is int
                and type(row[1]) is bytes for row in states):
            raise ProtocolError("malformed states in invalidation broadcast")
    return body
