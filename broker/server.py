"""The broker server: a Dobbin database served over ZeroMQ.

Threads (all started by start(), all joined by stop()):

    front      owns the ROUTER socket; decodes and validates every request,
               answers cheap reads (protocol.INLINE) itself and queues the
               rest for the workers; forwards the workers' replies.
    worker-N   run commits, calls, searches, syncs, each in its own Dobbin
               transaction; reply through an inproc PUSH to the front.
    publisher  owns the PUB socket; publishes every committed transaction
               the database reports (db.subscribe) and calls db.sync()
               every poll_interval seconds to notice other writers.

Each broadcast carries the tid of the committed transaction and the tid of
the previous one this server broadcast ("prev"), so a client that misses
one notices the gap; failed transactions are never broadcast.  The server
also remembers the last `history` committed transactions, so a client's
sync request gets exactly the oids changed since its last known tid (or
"flush" when the history does not reach back that far).
"""

import bisect
import logging
import queue
import random
import threading
import traceback

import transaction
import zmq
from zope.interface import implementer

from broker import exc, protocol
from broker.codec import MAX_MESSAGE, Codec
from broker.export import ExportRegistry
from broker.handlers import Handlers
from broker.interfaces import IBrokerServer
from broker.keys import KeyRing, load_or_create_secret, secret_path_for
from dobbin.persistent import Persistent, checkout

logger = logging.getLogger("broker.server")

_STOP = b"stop"


class InvalidationHistory:
    """The oids changed by each committed transaction, for the last `size` of them.

    Fed by the database's subscribe callback (any thread), read by sync and
    commit handlers.  It knows every committed tid in (floor, top].
    """

    def __init__(self, floor, size=10000):
        self._lock = threading.Lock()
        self._tids = []
        self._oids = []
        self.floor = floor
        self.top = floor
        self.size = size

    def add(self, tid, oids):
        with self._lock:
            if tid <= self.top:
                return  # already known (a duplicate notification)
            self._tids.append(tid)
            self._oids.append(oids)
            self.top = tid
            if len(self._tids) > self.size:
                drop = len(self._tids) - self.size
                self.floor = self._tids[drop - 1]
                del self._tids[:drop], self._oids[:drop]

    def changes(self, since, upto):
        """Sorted oids changed in (since, upto], or None if not all are known.

        The caller makes sure every callback up to `upto` has run
        (BrokerServer.sync_database).
        """
        with self._lock:
            if since is None or since < self.floor:
                return None
            if since >= upto:
                return []
            start = bisect.bisect_right(self._tids, since)
            end = bisect.bisect_right(self._tids, upto)
            changed = set()
            for oids in self._oids[start:end]:
                changed.update(oids)
            return sorted(changed)


@implementer(IBrokerServer)
class BrokerServer:
    """Serves `db` at `address` ("tcp://127.0.0.1:*", "ipc:///path"...).

    `broadcast` is the PUB endpoint (default: same host, any port; for
    ipc://PATH, ipc://PATH.pub).  `secret_file` defaults to the database
    path + ".broker-secret".  `debug` sends server tracebacks with errors.
    Subclass it and add do_NAME methods to serve client.call("NAME", ...).
    """

    def __init__(self, db, address="tcp://127.0.0.1:*", broadcast=None, secret_file=None,
                 workers=4, poll_interval=0.03, history=10000, debug=False, name=None,
                 max_message=MAX_MESSAGE, curve_secret_key=None, curve_allow=None):
        self.db = db
        self.requested_address = address
        self.requested_broadcast = broadcast or _default_broadcast(address)
        self.address = None
        self.broadcast_address = None
        self.workers = workers
        self.poll_interval = poll_interval
        self.debug = debug
        self.name = name or "dobbin-broker"
        self.max_message = max_message
        self.instance = random.SystemRandom().getrandbits(48)
        self.exports = ExportRegistry()
        if secret_file is None:
            secret_file = secret_path_for(db.path)
        self.keyring = KeyRing(load_or_create_secret(secret_file))
        self.history = InvalidationHistory(0, history)
        self.broadcast_seq = 0
        self.curve_secret_key = curve_secret_key
        self.curve_allow = curve_allow
        self._statics = {}
        self._static_paths = {}
        self._handlers = Handlers(self)
        self._codec = Codec(default=self._encode_object, on_key=self._check_key,
                            max_message=max_message)
        self._unchecked_codec = Codec(max_message=max_message)
        self._work = queue.Queue()
        self._outbox = []
        self._outbox_ready = threading.Condition()
        self._threads = []
        self._context = None
        self._results_endpoint = "inproc://broker-results-%x" % self.instance
        self._running = False
        self._auth = None

    # -- configuration -----------------------------------------------------------

    def export_class(self, cls, **options):
        return self.exports.export_class(cls, **options)

    def add_static(self, obj, *path):
        path = _check_path(path)
        self._statics[path] = obj
        self._static_paths[id(obj)] = path

    def del_static(self, *path):
        obj = self._statics.pop(_check_path(path))
        self._static_paths.pop(id(obj), None)

    def static_object(self, path):
        try:
            return self._statics[tuple(path)]
        except KeyError:
            raise KeyError("no static object at %r" % (tuple(path),)) from None

    def key_for(self, obj):
        if isinstance(obj, Persistent) and obj._p_oid is not None:
            return self.keyring.sign("o", obj._p_oid)
        path = self._static_paths.get(id(obj))
        if path is not None:
            return self.keyring.sign("s", path)
        raise exc.EncodeError("%r is neither stored nor a static object" % (obj,))

    def _encode_object(self, obj):
        return self.key_for(obj)

    def _check_key(self, key):
        if key.kind != "n":
            self.keyring.verify(key)
        return key

    # -- server-side changes -------------------------------------------------------

    def obj_new(self, cls, **fields):
        # Like objects clients create: __init__ is not run, `fields` are the state.
        obj = cls.__new__(cls)
        checkout(obj)
        for name, value in fields.items():
            setattr(obj, name, value)
        return obj

    def obj_update(self, obj, **fields):
        if not isinstance(obj, Persistent):
            for name, value in fields.items():
                setattr(obj, name, value)
            path = self._static_paths.get(id(obj))
            if path is not None:
                self._enqueue(("static", [list(path)]))
            return None
        checkout(obj)
        for name, value in fields.items():
            setattr(obj, name, value)
        transaction.commit()
        return obj._p_serial

    def obj_delete(self, container, name):
        if isinstance(container, Persistent):
            checkout(container)
        if hasattr(container, "keys") and hasattr(container, "__delitem__"):
            del container[name]
        else:
            delattr(container, name)
        if isinstance(container, Persistent):
            transaction.commit()
            return container._p_serial
        path = self._static_paths.get(id(container))
        if path is not None:
            self._enqueue(("static", [list(path)]))
        return None

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):
        if self._running:
            return self
        self._context = zmq.Context()
        router = pub = results = None
        try:
            if self.curve_secret_key is not None:
                self._start_curve()
            router = self._socket(zmq.ROUTER)
            router.setsockopt(zmq.MAXMSGSIZE, self.max_message + 4096)
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            router.bind(self.requested_address)
            self.address = router.getsockopt(zmq.LAST_ENDPOINT).decode()
            pub = self._socket(zmq.PUB)
            pub.bind(self.requested_broadcast)
            self.broadcast_address = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
            results = self._context.socket(zmq.PULL)
            results.setsockopt(zmq.LINGER, 0)
            results.bind(self._results_endpoint)
        except BaseException:
            for sock in (router, pub, results):
                if sock is not None:
                    sock.close(0)
            self._stop_curve()
            self._context.term()
            self._context = None
            raise
        # Subscribe before reading the tid: nothing committed after it is missed.
        self.db.subscribe(self._on_commit)
        tid = self.sync_database()
        self.history = InvalidationHistory(tid, self.history.size)
        self._last_broadcast = tid
        self._running = True
        self._stopping = threading.Event()
        self._spawn("broker-front", self._front, router, results)
        for n in range(self.workers):
            self._spawn("broker-worker-%d" % n, self._worker)
        self._spawn("broker-publisher", self._publisher, pub)
        return self

    def stop(self):
        if not self._running:
            return
        self._running = False
        self._stopping.set()
        with self._outbox_ready:
            self._outbox_ready.notify_all()
        for _ in range(self.workers):
            self._work.put(None)
        control = self._context.socket(zmq.PUSH)
        control.setsockopt(zmq.LINGER, 1000)
        control.connect(self._results_endpoint)
        control.send(_STOP)
        control.close()
        for thread in self._threads:
            thread.join()
        self._threads = []
        try:
            self.db.unsubscribe(self._on_commit)
        except ValueError:
            pass
        self._stop_curve()
        self._context.term()
        self._context = None

    def _socket(self, kind):
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve_secret_key is not None:
            sock.curve_server = True
            sock.curve_secretkey = self.curve_secret_key
        return sock

    def _start_curve(self):
        from zmq.auth.thread import ThreadAuthenticator
        self._auth = ThreadAuthenticator(self._context)
        self._auth.start()
        if self.curve_allow is None:
            self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            self._auth.configure_curve_callback(domain="*", credentials_provider=_AllowList(
                self.curve_allow))

    def _stop_curve(self):
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def _spawn(self, name, target, *args):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- the front thread ---------------------------------------------------------------

    def _front(self, router, results):
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        try:
            while True:
                for sock, _event in poller.poll():
                    if sock is results:
                        frames = results.recv_multipart()
                        if frames == [_STOP]:
                            return
                        router.send_multipart(frames)
                    else:
                        reply = self._receive(router.recv_multipart())
                        if reply is not None:
                            router.send_multipart(reply)
        finally:
            router.close(0)
            results.close(0)

    def _receive(self, frames):
        """Handle one ROUTER message; return the reply frames, or None if queued."""
        try:
            routing, data = protocol.split_request(frames)
        except exc.ProtocolError as error:
            return self._error_frames(error.routing, None, error)
        rid = None
        try:
            body = self._codec.decode(data)
            rid = protocol.request_id(body)
            rid, op, fields = protocol.check_request(body)
        except exc.AccessDenied as error:
            # A forged key stopped the decoding; find the id to answer it.
            return self._error_frames(routing, self._request_id_of(data), error)
        except exc.ProtocolError as error:
            return self._error_frames(routing, rid, error)
        if op in protocol.INLINE:
            return self._answer(routing, rid, op, fields)
        self._work.put((routing, rid, op, fields))
        return None

    def _request_id_of(self, data):
        try:
            return protocol.request_id(self._unchecked_codec.decode(data))
        except (exc.ProtocolError, exc.AccessDenied):
            return None

    def _error_frames(self, routing, rid, error):
        body = protocol.error_reply(rid, self.instance, exc.to_wire(error))
        return [routing, b"", protocol.MAGIC, self._codec.encode(body)]

    def _answer(self, routing, rid, op, fields):
        try:
            result = getattr(self._handlers, "op_" + op)(fields)
            data = self._codec.encode(protocol.ok_reply(rid, self.instance, result))
        except Exception as error:
            tb = traceback.format_exc() if self.debug else None
            if not isinstance(error, (exc.BrokerError, KeyError, AttributeError)):
                logger.debug("request %s failed", op, exc_info=True)
            data = self._codec.encode(protocol.error_reply(
                rid, self.instance, exc.to_wire(error, tb)))
        return [routing, b"", protocol.MAGIC, data]

    # -- workers -----------------------------------------------------------------------

    def _worker(self):
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self._results_endpoint)
        try:
            while True:
                job = self._work.get()
                if job is None:
                    return
                push.send_multipart(self._answer(*job))
        finally:
            push.close(0)

    # -- invalidations -------------------------------------------------------------------

    def sync_database(self):
        """Catch the database up; return its tid once every callback up to it has run."""
        tid = self.db.sync()
        # sync() can return while another thread still runs the callbacks of
        # the notes it took; its notify lock is held until they are done.
        lock = getattr(self.db, "_notify_lock", None)
        if lock is not None:
            with lock:
                pass
        return tid

    def _on_commit(self, tid, oids):
        # Called by Dobbin in whatever thread committed or caught up: be quick.
        self.history.add(tid, oids)
        self._enqueue(("tid", tid, oids))

    def _enqueue(self, item):
        with self._outbox_ready:
            self._outbox.append(item)
            self._outbox_ready.notify()

    def _publisher(self, pub):
        try:
            while not self._stopping.is_set():
                with self._outbox_ready:
                    if not self._outbox:
                        self._outbox_ready.wait(self.poll_interval)
                    items, self._outbox = self._outbox, []
                if not items and not self._stopping.is_set():
                    try:
                        self.sync_database()
                    except Exception:
                        logger.exception("catching up with %s failed", self.db.path)
                    continue
                for item in items:
                    self._publish(pub, item)
        finally:
            pub.close(0)

    def _publish(self, pub, item):
        self.broadcast_seq += 1
        if item[0] == "tid":
            _kind, tid, oids = item
            if tid <= self._last_broadcast:
                self.broadcast_seq -= 1
                return
            body = protocol.invalidation(self.instance, self.broadcast_seq, tid,
                                         self._last_broadcast, sorted(oids))
            self._last_broadcast = tid
        else:
            body = protocol.static_invalidation(self.instance, self.broadcast_seq, item[1])
        pub.send_multipart([protocol.TOPIC, self._codec.encode(body)])


class _AllowList:
    """CURVE credentials provider: only the listed client public keys get in."""

    def __init__(self, keys):
        self.keys = {k if isinstance(k, bytes) else k.encode() for k in keys}

    def callback(self, domain, key):
        return key in self.keys


def _check_path(path):
    if not path or not all(isinstance(p, (str, int)) for p in path):
        raise exc.ExportError("a static key path is one or more str or int parts, got %r"
                              % (path,))
    return tuple(path)


def _default_broadcast(address):
    if address.startswith("ipc://"):
        return address + ".pub"
    if address.startswith("tcp://"):
        host = address[len("tcp://"):].rsplit(":", 1)[0]
        return "tcp://%s:*" % host
    if address.startswith("inproc://"):
        return address + ".pub"
    raise exc.ExportError("cannot derive a broadcast endpoint from %r; pass broadcast="
                          % address)
