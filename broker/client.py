"""The broker client: proxies of a remote Dobbin database, one transaction at a time.

A client transaction reads one snapshot of the database, named by its tid.
Object states are loaded at that tid and cached across transactions.  What
the client learns of the server's changes (broadcasts, sync and commit
replies) and how it applies that to its caches at transaction boundaries
is broker.invalidations; this module is the requests and the proxies' side.
"""

import itertools
import os
import time
import weakref

from zope.interface import implementer

from broker import exc, protocol
from broker.changes import DELETED, LocalChanges, private_copy
from broker.codec import ABSENT, Codec
from broker.interfaces import IBrokerClient
from broker.invalidations import Invalidations
from broker.keys import Key
from broker.proxy import MappingProxy, Proxy, RemoteMethod, RemoteStream
from broker.transport import SPIN, Connection, UseLock

PAGE = 1000
MAPPING_METHODS = frozenset({"keys", "values", "items", "get"})
# Bounds of what is kept across transactions: search results (the oldest
# go first), and the items looked up one by one in each mapping (misses
# included: dropped all at once when full).
SEARCH_CACHE = 256
ITEM_CACHE = 1024


@implementer(IBrokerClient)
class BrokerClient:
    """A connection to the broker server at `address`.

    `timeout` and `retries` bound each request (lazy pirate: each retry uses
    a fresh socket).  `curve` is (server public key, client public key,
    client secret key) for a CURVE server.  `trace`, if given, is called
    with (direction, frames) for every message sent and received.  `spin`
    is how many seconds to busy-wait for the reply to a quick read (a load,
    an item) before blocking: 0 never does (see broker.transport.SPIN).
    """

    def __init__(self, address, timeout=2.5, retries=3, curve=None, trace=None, spin=SPIN):
        self.address = address
        self._lock = UseLock()
        self._codec = Codec(default=self._encode_object, on_key=self._decode_key)
        self._cache = weakref.WeakValueDictionary()   # key token -> Proxy
        self._metas = {}
        self._searches = {}      # (mode, target, query bytes, limit) -> (result, deps)
        self._watch = {}         # oid -> set of mapping proxies whose items depend on it
        self._watch_pruned_at = 0  # len(_watch) when its empty sets were last dropped
        self._root = None
        self._asked_latest_at = -1.0  # see wait_for_broadcast
        self._changes = LocalChanges()
        self._numbers = itertools.count(1)
        self._conn = Connection(address, self._codec, timeout, retries, curve, trace, spin)
        self._invalidations = Invalidations(self._conn, self._cache, self._searches,
                                            self._watch, self._record, self._take)
        try:
            with self._lock:
                self._hello()
                self.begin()
        except BaseException:
            self._conn.close()
            raise

    # -- requests ------------------------------------------------------------

    def _call(self, op, while_waiting=None, **fields):
        server, ok, result = self._conn.request(op, fields, while_waiting)
        if server != self._invalidations.server and op != "hello":
            self._server_changed()
        if not ok:
            raise exc.from_wire(result)
        return protocol.check_result(op, result)

    def _hello(self):
        info = self._call("hello")
        if info["version"] != protocol.VERSION:
            raise exc.ProtocolError("server speaks protocol %r, we speak %d"
                                    % (info["version"], protocol.VERSION))
        self._invalidations.follow(info["server"], info.get("seq"))
        self._root = info["root"]
        self._conn.subscribe(info["broadcast"])

    def _server_changed(self):
        # Another server instance answered (a restart): what we know of
        # invalidations may have holes, the broadcast endpoint may move, and
        # the classes' export rules may be others.
        self._invalidations.restarted()
        self._metas.clear()
        self._hello()

    # -- codec hooks -----------------------------------------------------------

    def _encode_object(self, obj):
        if isinstance(obj, Proxy) and obj._client is self:
            self._check_live(obj)
            return obj._key
        if isinstance(obj, RemoteStream) and obj._client is self:
            return obj._key
        raise exc.EncodeError("cannot send %r" % (obj,))

    def _decode_key(self, key):
        if key.kind == "f":
            return RemoteStream(self, key)
        if key.kind == "n":
            raise exc.ProtocolError("the server sent a client-side key")
        proxy = self._cache.get(key.token)
        if proxy is None:
            proxy = self._cache[key.token] = Proxy(self, key)
        return proxy

    # -- transactions ------------------------------------------------------------

    @property
    def root(self):
        with self._lock:
            return self._root

    @property
    def tid(self):
        return self._tid

    def begin(self):
        with self._lock:
            self._changes.clear()
            # Broadcasts are taken in while the server works.
            result = self._call("sync", since=self._known,
                                while_waiting=self._invalidations.drain)
            self._root = result["root"]
            self._invalidations.synced(result["tid"], result["changed"], result.get("seq"))
            return self._tid

    def abort(self):
        with self._lock:
            self._changes.clear()
            self._invalidations.aborted()

    def commit(self):
        with self._lock:
            if not self._changes:
                self.abort()
                return self._tid
            fields = self._changes.message()
            new = dict(self._changes.new)
            changed = self._changes.changed_proxies()
            try:
                result = self._call("commit", tx=self._tid, since=self._known,
                                    token=os.urandom(16),
                                    while_waiting=self._invalidations.drain, **fields)
            except BaseException:
                for proxy in changed:
                    proxy._ghostify()
                self.abort()
                raise
            for number, decoded in result["created"]:
                proxy, _class_name = new[number]
                object.__setattr__(proxy, "_key", decoded._key)
                self._cache[decoded._key.token] = proxy
            for proxy in changed:
                proxy._ghostify()
            self._changes.clear()
            self._root = result["root"]
            # The reply has the states of what we wrote, as of the new snapshot.
            self._invalidations.committed(
                result["tid"], result["changed"],
                [(decoded._key.token, data) for decoded, data in result["states"]])
            return result["tid"]

    def wait_for_broadcast(self, tid=None, timeout=1.0):
        """Wait up to `timeout` s for a broadcast (of `tid` or later, if given).

        Broadcasts received are kept for the next boundary; returns the
        highest tid broadcast so far (at once if `tid` is known already),
        or None if none came.  If the wait ends short of that, the server
        is asked once (at most once a second) for its latest tid, which
        is returned if it is the one awaited: broadcasts are lost while
        a restarted server is reached again (maybe at another port).
        """
        deadline = time.monotonic() + timeout
        while True:
            # The lock is let go between polls: other threads read meanwhile.
            with self._lock:
                done, seen = self._invalidations.poll(tid)
            if done or time.monotonic() >= deadline:
                break
        if done or time.monotonic() < self._asked_latest_at + 1:
            return seen
        with self._lock:
            self._asked_latest_at = time.monotonic()
            info = self._call("hello")
            if info["server"] != self._invalidations.server:
                self._server_changed()  # follows it: its broadcasts reach us
        latest, known = info["tid"], self._invalidations.known
        heard = [number for number in (seen, known) if number is not None]
        if (latest is not None and (not heard or latest > max(heard))
                and (tid is None or latest >= tid)):
            return latest  # committed since the last we heard of
        return seen

    # The snapshot and the last tid known, which requests name.
    _tid = property(lambda self: self._invalidations.tid)
    _known = property(lambda self: self._invalidations.known)

    # -- objects ---------------------------------------------------------------

    def _meta(self, class_name):
        meta = self._metas.get(class_name)
        if meta is None:
            meta = self._metas[class_name] = self._call("meta", **{"class": class_name})
        return meta

    def _load(self, proxy):
        state = proxy._state
        if state is None:
            if proxy._key.kind == "n":
                return {}
            result = self._call("load", key=proxy._key, tx=self._tid)
            self._set_class(proxy, result["class"])
            object.__setattr__(proxy, "_state", result["state"])
            state = result["state"]
        return state

    def _set_class(self, proxy, class_name):
        object.__setattr__(proxy, "_class", class_name)
        if self._meta(class_name)["mapping"] and type(proxy) is Proxy:
            object.__setattr__(proxy, "__class__", MappingProxy)

    def _record(self, data, serial):
        """The state record encoded in `data` (of transaction `serial`, if given), or None.

        Anything unexpected (noise from a wrong key, a class whose
        description we lack) gives None: the object is loaded as usual.
        """
        try:
            record = protocol.check_result("load", self._codec.decode(data))
        except exc.BrokerError:
            return None
        if record["class"] not in self._metas or (
                serial is not None and record["serial"] != serial):
            return None
        return record

    def _take(self, proxy, record):
        self._set_class(proxy, record["class"])
        object.__setattr__(proxy, "_state", record["state"])

    def _proxy_meta(self, proxy):
        self._load(proxy)
        return self._meta(proxy._class)

    def _read_attr(self, proxy, name):
        with self._lock:
            if self._changes.attrs:
                value = self._changes.get_attr(proxy, name, ABSENT)
                if value is DELETED:
                    raise AttributeError("%r has no attribute %r (deleted)" % (proxy, name))
                if value is not ABSENT:
                    return value
            state = proxy._state
            if state is None:
                state = self._load(proxy)
            if name in state:
                value = state[name]
                if type(value) is RemoteStream:
                    # One of its own, at this snapshot: a file position and
                    # close() are not to be shared by every reader.
                    return RemoteStream(self, value._key, self._tid)
                return private_copy(value)
            if isinstance(proxy, MappingProxy) and name in MAPPING_METHODS:
                return getattr(proxy, name)  # it became a mapping proxy on load
            if name in self._proxy_meta(proxy)["callables"]:
                return RemoteMethod(proxy, name)
            raise AttributeError("%r has no attribute %r" % (proxy, name))

    def _check_writable(self, proxy, name):
        meta = self._proxy_meta(proxy)
        writable, readonly = meta["writable"], meta.get("readonly") or ()
        if (name in meta["callables"] or readonly is True or name in readonly
                or (writable is not None and name not in writable)):
            raise AttributeError("%s.%s is not writable" % (meta["name"], name))

    def _check_live(self, proxy):
        """Refuse the proxy of an object created in a transaction that
        ended without storing it: nothing would ever send its changes."""
        key = proxy._key
        if key.kind == "n" and key.ident not in self._changes.new:
            raise exc.StaleProxyError(
                "%r was created in a transaction that ended without storing it" % (proxy,))

    def _write_attr(self, proxy, name, value):
        with self._lock:
            self._check_live(proxy)
            self._check_writable(proxy, name)
            old = self._load(proxy).get(name, ABSENT)
            self._changes.set_attr(proxy, name, value, old)

    def _delete_attr(self, proxy, name):
        with self._lock:
            self._check_live(proxy)
            self._check_writable(proxy, name)
            state = self._load(proxy)
            current = self._changes.get_attr(proxy, name, state.get(name, ABSENT))
            if current is ABSENT or current is DELETED:
                raise AttributeError("%r has no attribute %r" % (proxy, name))
            self._changes.set_attr(proxy, name, DELETED, state.get(name, ABSENT))

    def _invoke(self, proxy, name, args, kwargs):
        with self._lock:
            return self._call("invoke", key=proxy._key, tx=self._tid, method=name,
                              args=list(args), kwargs=kwargs, token=os.urandom(16))

    def _read_stream(self, key, offset, size, tid=None):
        with self._lock:
            result = self._call("stream", key=key, tx=self._tid if tid is None else tid,
                                offset=offset, size=size)
            return result["data"], result["size"]

    # -- mapping items -------------------------------------------------------------

    def _is_mapping(self, proxy):
        with self._lock:
            return bool(self._proxy_meta(proxy)["mapping"])

    def _check_mapping(self, proxy):
        if not self._is_mapping(proxy):
            raise exc.InvalidTypeError("%r is not a mapping" % (proxy,))

    def _remote_item(self, proxy, item):
        """The item's value at the snapshot, or ABSENT (cached per transaction)."""
        if proxy._key.kind == "n":
            return ABSENT
        if proxy._items is None:
            object.__setattr__(proxy, "_items", {})
        try:
            if proxy._all is not None:
                return proxy._all.get(item, ABSENT)
            if item in proxy._items:
                return proxy._items[item]
        except TypeError:
            raise exc.InvalidTypeError("unhashable mapping key %r" % (item,)) from None
        result = self._call("item", key=proxy._key, tx=self._tid, item=item)
        self._watch_deps(proxy, result["deps"])
        value = result["value"][0] if result["value"] else ABSENT
        if len(proxy._items) >= ITEM_CACHE:
            proxy._items.clear()
        proxy._items[item] = value
        return value

    def _watch_deps(self, proxy, deps):
        # Weakly: a mapping proxy the application dropped, and its listing,
        # must not live on until one of its oids changes.
        for oid in deps or ():
            watchers = self._watch.get(oid)
            if watchers is None:
                watchers = self._watch[oid] = weakref.WeakSet()
            watchers.add(proxy)
        if len(self._watch) > 2 * self._watch_pruned_at:
            # Those of dropped proxies stayed, empty, until their oid changed.
            for oid in [oid for oid, watchers in self._watch.items() if not watchers]:
                del self._watch[oid]
            self._watch_pruned_at = max(256, len(self._watch))

    def _get_item(self, proxy, item):
        with self._lock:
            self._check_mapping(proxy)
            value = self._changes.get_item(proxy, item, ABSENT)
            if value is DELETED:
                raise KeyError(item)
            if value is not ABSENT:
                return value  # pending: as an attribute's, changes to it are committed
            value = self._remote_item(proxy, item)
            if value is ABSENT:
                raise KeyError(item)
            return private_copy(value)

    def _has_item(self, proxy, item):
        try:
            self._get_item(proxy, item)
        except KeyError:
            return False
        return True

    def _set_item(self, proxy, item, value):
        with self._lock:
            self._check_live(proxy)
            self._check_mapping(proxy)
            if not self._proxy_meta(proxy).get("items_writable"):
                raise exc.InvalidTypeError("items of %r are not writable" % (proxy,))
            self._changes.set_item(proxy, item, value, self._remote_item(proxy, item))

    def _delete_item(self, proxy, item):
        with self._lock:
            self._check_live(proxy)
            self._get_item(proxy, item)  # KeyError if there is none
            if not self._proxy_meta(proxy).get("items_writable"):
                raise exc.InvalidTypeError("items of %r are not writable" % (proxy,))
            self._changes.set_item(proxy, item, DELETED, self._remote_item(proxy, item))

    def _listing(self, proxy):
        """All (key, value) pairs of a mapping proxy, local changes included."""
        with self._lock:
            self._check_mapping(proxy)
            if proxy._all is None:
                pairs = {}
                if proxy._key.kind != "n":
                    start = 0
                    while True:
                        page = self._call("items", key=proxy._key, tx=self._tid,
                                          start=start, limit=PAGE)
                        self._watch_deps(proxy, page["deps"])
                        pairs.update((k, v) for k, v in page["items"])
                        start += len(page["items"])
                        if not page["more"] or not page["items"]:
                            break
                object.__setattr__(proxy, "_all", pairs)
            merged = dict(proxy._all)
            for item, value in self._changes.item_changes(proxy).items():
                if value is DELETED:
                    merged.pop(item, None)
                else:
                    merged[item] = value
            return list(private_copy(merged).items())

    # -- application API -------------------------------------------------------------

    def call(self, name, *args, **kwargs):
        with self._lock:
            return self._call("call", name=name, args=list(args), kwargs=kwargs,
                              token=os.urandom(16))

    def static(self, *path):
        with self._lock:
            return self._call("static", path=list(path))

    def new(self, class_name, **fields):
        with self._lock:
            meta = self._meta(class_name)
            if not meta.get("creatable"):
                raise exc.AccessDenied("clients may not create %s objects" % class_name)
            number = next(self._numbers)
            proxy = Proxy(self, Key("n", number))
            self._set_class(proxy, class_name)
            object.__setattr__(proxy, "_state", {})
            for name in fields:
                self._check_writable(proxy, name)  # before the transaction knows it
            self._changes.add_new(number, proxy, class_name)
            for name, value in fields.items():
                self._changes.set_attr(proxy, name, value, ABSENT)
            return proxy

    def get(self, target, where=None, /, **fields):
        return self._search(target, "get", _query(where, fields), None)

    def find(self, target, where=None, /, *, limit=None, **fields):
        return self._search(target, "find", _query(where, fields), limit)

    def count(self, target, where=None, /, **fields):
        return self._search(target, "count", _query(where, fields), None)

    def _search(self, target, mode, query, limit):
        with self._lock:
            if isinstance(target, Proxy):
                wire_target, name = self._encode_object(target), target._key.token
            elif isinstance(target, str):
                wire_target = name = target
            else:
                raise exc.InvalidTypeError("search a mapping proxy or a class name, not %r"
                                           % (target,))
            entry = (mode, name, self._codec.encode(query), limit)
            hit = self._searches.get(entry)
            if hit is None:
                result = self._call("search", target=wire_target, tx=self._tid, mode=mode,
                                    query=query, limit=limit)
                if len(self._searches) >= SEARCH_CACHE:
                    del self._searches[next(iter(self._searches))]
                hit = self._searches[entry] = (result["result"], result["deps"])
            result = hit[0]
            return list(result) if isinstance(result, list) else result

    def close(self):
        # A request in flight in another thread holds the lock: it gives up
        # its wait (ClientClosed) instead of finishing its retries first.
        self._conn.closing = True
        with self._lock.rlock:
            if not self._lock.closed:
                self._lock.closed = True
                self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _query(where, fields):
    """The fields a search matches: `where` (a dict, for names that are
    also parameters, such as "limit") and the keyword arguments."""
    if where is None:
        return fields
    if not isinstance(where, dict):
        raise exc.InvalidTypeError("search fields are a dict or keyword arguments, not %r"
                                   % (where,))
    both = sorted(set(where) & set(fields))
    if both:
        raise exc.InvalidTypeError("search field %s given twice" % ", ".join(map(repr, both)))
    return {**where, **fields}
