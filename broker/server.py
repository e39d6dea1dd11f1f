"""The broker server: a Dobbin database served over ZeroMQ.

Threads (all started by start(), all joined by stop()):

    front      owns the ROUTER socket and blocks on it alone: decodes and
               validates every request, answers cheap reads (protocol.INLINE)
               itself, runs small commits itself while that is quick (see
               _receive), and queues the rest for the workers.  The workers'
               replies come back to it through the same ROUTER (an inproc
               endpoint, under routing ids only this process knows), so one
               blocking receive serves both and no poll is needed.
    worker-N   run calls, searches and the other commits, each in its own
               Dobbin transaction; commits running at once are synced to
               disk together (group commit).  Two by default: more Python
               threads mostly contend for the GIL.
    poller     calls db.sync() every poll_interval seconds to notice other
               writers.

Broadcasts are published by whichever thread learns of a committed
transaction: the database calls the server back (db.subscribe) in the
thread that committed or caught up, so a commit made through this server
is broadcast before its commit reply leaves.  Each broadcast carries the
tid of the committed transaction and the tid of the previous one this
server broadcast ("prev"), so a client that misses one notices the gap;
failed transactions are never broadcast.  For small transactions it also
carries each changed object's state record, sealed under that object's key
(broker.states), so a client holding the key can take the new state at
its next begin() without loading it.  The server also remembers the last
`history` committed transactions, so a client's sync request gets exactly
the oids changed since its last known tid (or "flush" when the history
does not reach back that far).
"""

import collections
import contextlib
import logging
import queue
import random
import threading
import time
import traceback

import msgpack
import zmq
from zope.interface import implementer

from broker import exc, protocol
from broker.backlog import BROADCAST_QUEUE, REPLY_QUEUE, ReplyBacklog
from broker.codec import MAX_MESSAGE, Codec
from broker.export import ExportRegistry
from broker.handlers import Handlers
from broker.history import InvalidationHistory
from broker.interfaces import IBrokerServer
from broker.keys import KeyRing, load_or_create_secret, secret_path_for
from broker.outcomes import WAIT, CommitOutcomes, Recorded
from broker.serverside import ServerSideChanges
from broker.states import Record, StateCache, seal
from broker.endpoints import bind, broadcast_address_for
from broker.transport import curve_authenticator, recv_frames, send_frames, set_curve_key
from dobbin.exc import DamagedHistoryError, DobbinError

logger = logging.getLogger("broker.server")

# Broadcast the records of transactions that changed at most this many
# objects, each record up to PUSH_RECORD bytes, up to PUSH_TOTAL per broadcast.
PUSH_OBJECTS = 32
PUSH_RECORD = 16 * 1024
PUSH_TOTAL = 256 * 1024
KEY_CACHE = 65536
# Commit requests up to this size may run in the front thread, while
# commits take at most this long on average (see _receive).
INLINE_COMMIT = 64 * 1024
INLINE_SECONDS = 0.002
# A starting server knows the tokens of this many latest commits (see broker.outcomes).
RECALLED_COMMITS = 1000
# Bytes of requests waiting for the workers, past which more are refused
# (Busy) rather than queued: decoded, a request may take 20 times its size.
MAX_QUEUED_BYTES = 16 * 1024 * 1024
# Requests ZeroMQ takes in from one connection before the front thread
# reads them: a client has one out at a time, and its copies come on
# fresh connections.
REQUEST_QUEUE = 8


@implementer(IBrokerServer)
class BrokerServer(ServerSideChanges):
    """Serves `db` at `address` ("tcp://127.0.0.1:*", "ipc:///path"...).

    `broadcast` is the PUB endpoint (default: same host, any port; for
    ipc://PATH, ipc://PATH.pub).  `secret_file` defaults to the database
    path + ".broker-secret".  `debug` sends server tracebacks with errors.
    `state_cache` bounds, in bytes, the state records kept for loads.
    `workers` is the number of worker threads (calls, searches, commits
    that are large or come while commits are slow: see _receive);
    raise it when exported methods wait on slow things, as each running
    call holds a worker.
    `curve_secret_key` (32 bytes or 40 Z85 characters) turns on CURVE;
    `curve_allow`, the client public keys let in (any form; needs a
    secret key), else any client with the server's public key gets in.
    Subclass it and add do_NAME methods to serve client.call("NAME", ...).
    """

    def __init__(self, db, address="tcp://127.0.0.1:*", broadcast=None, secret_file=None,
                 workers=2, poll_interval=0.03, history=10000, debug=False, name=None,
                 max_message=MAX_MESSAGE, curve_secret_key=None, curve_allow=None,
                 state_cache=32 * 1024 * 1024):
        self.db = db
        self.requested_address = address
        self.requested_broadcast = broadcast or broadcast_address_for(address)
        self.address = None
        self.broadcast_address = None
        self._bindings = []  # endpoints bound by start(), released by stop()
        if type(workers) is not int or workers < 1:
            raise exc.ExportError("workers must be a positive int, not %r" % (workers,))
        self.workers = workers
        self.poll_interval = poll_interval
        self.debug = debug
        self.name = name or "dobbin-broker"
        self.max_message = max_message
        self.instance = None  # a new number at each start(): see _new_instance
        self.exports = ExportRegistry()
        if secret_file is None:
            secret_file = secret_path_for(db.path)
        self.keyring = KeyRing(load_or_create_secret(secret_file))
        self.history = InvalidationHistory(0, history)
        self.states = StateCache(0, state_cache)
        self.broadcast_seq = 0
        self.requests = collections.Counter()
        self.curve_secret_key = curve_secret_key
        self.curve_allow = curve_allow
        self._init_server_side()
        self._handlers = Handlers(self)
        self._ops = {op: getattr(self._handlers, "op_" + op) for op in protocol.REQUESTS}
        # The MAC check is a pure function of a key's bytes: remember its results.
        self._codec = Codec(default=self.key_for, on_key=self._check_key,
                            max_message=max_message, key_cache=KEY_CACHE)
        self._unchecked_codec = Codec(max_message=max_message)
        self._work = queue.Queue()
        self._threads = {}
        self._context = None
        self._pub = None
        self._pub_lock = threading.Lock()
        self._last_broadcast = 0
        # Workers reach the front thread through the ROUTER itself; their
        # routing ids are random, so no remote peer can pose as one.
        token = random.SystemRandom().getrandbits(128).to_bytes(16, "big")
        self._front_endpoint = "inproc://broker-front-%s" % token.hex()
        self._control_id = token + b"stop"
        self._worker_ids = [token + b"w%d" % n for n in range(workers)]
        self._internal_ids = frozenset(self._worker_ids) | {self._control_id}
        self._running = False
        self._auth = None
        self._commit_seconds = 0.0  # moving average of commit durations
        self._queued_lock = threading.Lock()

    # -- configuration -----------------------------------------------------------

    def export_class(self, cls, **options):
        if self._running:
            # The states it sent and cached went by the old rules.
            raise exc.ExportError("export_class() goes before start() (or after stop())")
        return self.exports.export_class(cls, **options)

    def _check_key(self, key):
        if key.kind != "n":
            self.keyring.verify(key)
        return key

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):
        if self._running:
            return self
        self._check_curve()
        self._context = zmq.Context()
        router = pub = None
        self._bindings = []
        try:
            if self.curve_secret_key is not None:
                self._start_curve()
            router = self._socket(zmq.ROUTER)
            router.setsockopt(zmq.MAXMSGSIZE, self.max_message + 4096)
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            router.setsockopt(zmq.SNDHWM, REPLY_QUEUE)
            # ZeroMQ's default (1000 a connection, 16 GiB at max_message)
            # let one peer that sends without reading fill memory.
            router.setsockopt(zmq.RCVHWM, REQUEST_QUEUE)
            self.address = self._bind(router, self.requested_address)
            router.bind(self._front_endpoint)
            pub = self._socket(zmq.PUB)
            pub.setsockopt(zmq.SNDHWM, BROADCAST_QUEUE)
            self.broadcast_address = self._bind(pub, self.requested_broadcast)
            self._new_instance()
            self.db.sync()
            # No callback runs while the database's notify lock is held (a
            # private lock of dobbin.database.Database): every transaction
            # after `tid` reaches _on_commit, and none up to it is mistaken
            # for a new one.
            with getattr(self.db, "_notify_lock", None) or contextlib.nullcontext():
                tid = self.db.last_tid
                self.history = InvalidationHistory(tid, self.history.size,
                                                   self.history.max_oids)
                self.states = StateCache(tid, self.states.max_bytes)
                self._last_broadcast = tid
                self._pub = pub
                self.db.subscribe(self._on_commit)
        except BaseException:
            # Nothing left bound or running.
            with contextlib.suppress(ValueError):
                self.db.unsubscribe(self._on_commit)
            self._pub = None
            for sock in (router, pub):
                if sock is not None:
                    sock.close(0)
            self._stop_curve()
            self._context.term()
            self._context = None
            self._release_bindings()
            raise
        self._running = True
        self._stopping = threading.Event()
        self._work = queue.Queue()  # nothing queued before a stop runs after it
        self._queued_bytes = 0      # of the requests waiting for the workers
        self._outcomes = CommitOutcomes()
        self._backlog = ReplyBacklog()
        try:
            # A copy of a commit whose server died before replying may come here.
            self._outcomes.recall(self.db.recent_transactions(RECALLED_COMMITS))
        except DamagedHistoryError as error:
            # The newest commits, the ones clients may be resending, come first.
            logger.error("recalling the latest commits of %s stopped at damage: %s",
                         self.db.path, error)
            self._outcomes.recall(error.found)
        except DobbinError:
            # Damaged metadata costs only this: such a copy runs again (and
            # fails its verification).  verify() reports the damage.
            logger.exception("could not read the latest commits of %s", self.db.path)
        self._threads = {"front": self._spawn("broker-front", self._front, router),
                         "workers": [self._spawn("broker-worker-%d" % n, self._worker,
                                                 self._worker_ids[n])
                                     for n in range(self.workers)],
                         "poller": self._spawn("broker-poller", self._poller)}
        return self

    def _new_instance(self):
        # A client tells a restarted server by its number (it may have
        # missed broadcasts, or listen at a port that has changed), even
        # when this same object serves again.
        self.instance = random.SystemRandom().getrandbits(48)
        self.broadcast_seq = 0
        self._reply_head = b"\xa3srv" + msgpack.packb(self.instance) + b"\xa2ok"

    def stop(self):
        if not self._running:
            return
        running = self._threads.get("workers", []) + [self._threads.get("front"),
                                                      self._threads.get("poller")]
        if threading.current_thread() in running:
            # Asked by a method the server runs: it cannot join its own
            # thread, so another stops it, once the method has returned.
            threading.Thread(target=self.stop, name="broker-stop").start()
            return
        self._running = False
        with self._queued_lock:
            self._stopping.set()
        # Workers first, while the front thread still forwards their
        # replies: a reply sent after it had gone would wait for ever.
        for _ in range(self.workers):
            self._work.put(None)
        for thread in self._threads["workers"]:
            thread.join()
        control = self._context.socket(zmq.DEALER)
        control.setsockopt(zmq.LINGER, 1000)
        control.setsockopt(zmq.ROUTING_ID, self._control_id)
        control.connect(self._front_endpoint)
        control.send(b"stop")
        control.close()
        self._threads["front"].join()
        self._threads["poller"].join()
        self._threads = {}
        with contextlib.suppress(ValueError):
            self.db.unsubscribe(self._on_commit)
        with self._pub_lock:
            self._pub.close(0)
            self._pub = None
        self._stop_curve()
        self._context.term()
        self._context = None
        self._release_bindings()

    def _bind(self, sock, address):
        binding = bind(sock, address)
        self._bindings.append(binding)
        return binding.endpoint

    def _release_bindings(self):
        """Give back the ipc:// paths bound, once their sockets are closed
        (ZeroMQ builds differ in whether closing removes the file)."""
        for binding in self._bindings:
            binding.release()
        self._bindings = []

    def _socket(self, kind):
        sock = self._context.socket(kind)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve_secret_key is not None:
                sock.curve_server = True
                set_curve_key(sock, zmq.CURVE_SECRETKEY, self.curve_secret_key)
        except BaseException:
            sock.close(0)  # an open socket would hold the context's term() for ever
            raise
        return sock

    def _start_curve(self):
        self._auth = curve_authenticator(self._context, self.curve_allow)

    def _check_curve(self):
        if self.curve_allow is not None and self.curve_secret_key is None:
            # An allow-list that lets everyone in, in plain text.
            raise exc.CurveKeyError("curve_allow needs curve_secret_key: without it the "
                                    "server would serve any client, unencrypted")

    def _stop_curve(self):
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def _spawn(self, name, target, *args):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        return thread

    # -- the front thread ---------------------------------------------------------------

    def _front(self, router):
        internal, control = self._internal_ids, self._control_id
        try:
            while True:
                frames = recv_frames(router)
                if frames[0] in internal:
                    if frames[0] == control:
                        return
                    # A worker's reply to a client.
                    self._backlog.send(router, frames[1:])
                    continue
                try:
                    reply = self._receive(frames)
                except Exception:
                    # Never expected; but one request must not stop the server.
                    logger.exception("request from %r failed unanswered", frames[0])
                    continue
                if reply is not None:
                    self._backlog.send(router, reply)
        finally:
            router.close(0)

    def _receive(self, frames):
        """Handle one ROUTER message; return the reply frames, or None if queued.

        A small commit runs here, in the front thread, when no worker is
        busy and commits are quick: handing it to a worker and its reply
        back costs two thread switches, more than the commit's own work
        (4 clients made a third more commits/s this way than through the
        workers, though the workers' commits share fsyncs).  Requests wait
        meanwhile, so a large commit, any while commits are slow (a slow
        disk), and any while another writer (a thread, a process) holds the
        write lock go to the workers, and the front goes on serving.
        """
        try:
            routing, data = protocol.split_request(frames)
        except exc.ProtocolError as error:
            return self._error_frames(error.routing, None, error)
        body = None
        try:
            body = self._codec.decode(data)
            rid, op, fields = protocol.check_request(body)
        except exc.AccessDenied as error:
            # A forged key stopped the decoding; find the id to answer it.
            return self._error_frames(routing, self._request_id_of(data), error)
        except exc.ProtocolError as error:
            return self._error_frames(routing, protocol.request_id(body), error)
        self.requests[op] += 1
        if op in protocol.INLINE and not self._reads_back(op, fields):
            return self._answer(routing, rid, op, fields)
        if op in protocol.ONCE:
            # A copy the client sent again, having waited in vain for the reply.
            outcome = self._outcomes.start((fields["token"], rid), routing)
            if outcome is WAIT:
                return None
            if type(outcome) is bytes:
                return [routing, b"", protocol.MAGIC, outcome]
            # For the handler (clients cannot set these); it sets "committed".
            fields.update(rid=rid, committed=None,
                          recorded=outcome if type(outcome) is Recorded else None)
            if (op == "commit" and len(data) <= INLINE_COMMIT
                    and self._commit_seconds <= INLINE_SECONDS
                    and not self._work.unfinished_tasks and not self.db.write_lock_busy()):
                # No copy can be waiting: copies register in this thread.
                return self._run_once(routing, rid, op, fields)[0]
        queued, refused = self._queue(routing, rid, op, fields, len(data))
        if queued:
            return None
        if op in protocol.ONCE:
            self._outcomes.abandon((fields["token"], rid), fields["recorded"])
        return refused

    def _reads_back(self, op, fields):
        """Whether a read, as of a transaction older than the newest and not
        in the state cache, may step back through old versions one record
        at a time (a client whose transaction began many commits of an
        object ago): the workers answer it, so that it cannot hold up
        everyone's quick reads."""
        if op not in ("load", "item") or fields["tx"] >= self.states.top:
            return False
        key = fields["key"]
        return op == "item" or (key.kind == "o"
                                and self.states.get(key.ident, fields["tx"]) is None)

    def _queue(self, routing, rid, op, fields, size):
        """Queue a request for the workers: (True, None) if it was, else
        (False, error frames) if too many bytes of requests wait already
        (one always may), or (False, None) if the server is stopping: it
        goes unanswered, and the client retries it, on this address's
        next server if there is one."""
        with self._queued_lock:
            # stop() sets the flag under this lock, then queues the workers'
            # ends: nothing is queued after them, where no worker takes it.
            if self._stopping.is_set():
                return False, None
            if self._queued_bytes and self._queued_bytes + size > MAX_QUEUED_BYTES:
                return False, self._error_frames(routing, rid, exc.Busy(
                    "the server has %d bytes of requests waiting; try again"
                    % self._queued_bytes))
            self._queued_bytes += size
            self._work.put((routing, rid, op, fields, size))
        return True, None

    def _request_id_of(self, data):
        try:
            return protocol.request_id(self._unchecked_codec.decode(data))
        except (exc.ProtocolError, exc.AccessDenied):
            return None

    def _error_frames(self, routing, rid, error, tb=None):
        return [routing, b"", protocol.MAGIC, self._error_data(rid, error, tb)]

    def _error_data(self, rid, error, tb=None):
        try:
            return self._codec.encode(protocol.error_reply(
                rid, self.instance, exc.to_wire(error, tb)))
        except exc.EncodeError:
            # to_wire bounds what it sends; this is the last line, so that
            # no error can leave a request unanswered.
            return self._codec.encode(protocol.error_reply(rid, self.instance, {
                "type": "RemoteError",
                "message": "a %s whose reply could not be encoded" % type(error).__name__}))

    def _answer(self, routing, rid, op, fields):
        return [routing, b"", protocol.MAGIC, self._reply(rid, op, fields)]

    def _reply(self, rid, op, fields):
        """The encoded reply to a request (an error reply if it failed)."""
        try:
            result = self._ops[op](fields)
            if type(result) is Record:
                # {"id": rid, "srv": ..., "ok": record}, the record spliced in as encoded.
                return b"\x83\xa2id" + msgpack.packb(rid) + self._reply_head + result.data
            return self._codec.encode(protocol.ok_reply(rid, self.instance, result))
        except BaseException as error:
            # BaseException too: an application method calling sys.exit()
            # would otherwise end the worker thread, for good.
            tb = traceback.format_exc() if self.debug else None
            if not isinstance(error, (exc.BrokerError, KeyError, AttributeError)):
                logger.debug("request %s failed", op, exc_info=True)
            return self._error_data(rid, error, tb)

    # -- workers -----------------------------------------------------------------------

    def _worker(self, ident):
        front = self._context.socket(zmq.DEALER)
        front.setsockopt(zmq.LINGER, 0)
        front.setsockopt(zmq.ROUTING_ID, ident)
        front.connect(self._front_endpoint)
        try:
            while True:
                job = self._work.get()
                if job is None:
                    return
                try:
                    self._work_on(front, *job[:4])
                finally:
                    with self._queued_lock:
                        self._queued_bytes -= job[4]
                    self._work.task_done()
        finally:
            front.close(0)

    def _work_on(self, front, routing, rid, op, fields):
        if op in protocol.ONCE:
            reply, copies = self._run_once(routing, rid, op, fields)
        else:
            try:
                reply, copies = self._answer(routing, rid, op, fields), ()
            except Exception:
                logger.exception("request %s failed unanswered", op)
                return
        if reply is not None:
            send_frames(front, reply)
            for copy in copies:
                send_frames(front, [copy] + reply[1:])

    def _run_once(self, routing, rid, op, fields):
        """Run a request of `protocol.ONCE`: (its reply frames or None, the
        routing ids of the copies that arrived meanwhile, each to get the
        same reply)."""
        key = (fields["token"], rid)
        started = time.monotonic()
        try:
            data = self._reply(rid, op, fields)
        except Exception:
            logger.exception("request %s failed unanswered", op)
            self._outcomes.abandon(key, fields["committed"] or fields["recorded"])
            return None, ()
        finally:
            if op == "commit":
                # A moving average: commits go to the workers while they are
                # slow, and come back once they are quick again.
                self._commit_seconds += (time.monotonic() - started - self._commit_seconds) / 8
        # What committed is remembered whatever its reply, so no copy runs it
        # again (a recorded one's answer too); what did not changed nothing,
        # and such failures (cheap to cause) cannot push others' outcomes out.
        recorded = fields["committed"] or fields["recorded"]
        return [routing, b"", protocol.MAGIC, data], self._outcomes.finish(key, data, recorded)

    # -- invalidations -------------------------------------------------------------------

    def sync_database(self):
        """Catch the database up; return the newest tid whose callbacks have all run.

        That tid is a consistent snapshot: every transaction up to it is in
        the history.  (db.sync() may return a newer tid whose commit is not
        yet durable and whose subscribers have not run yet.)
        """
        self.db.sync()  # returns once the subscribers of every durable commit have run
        return self.history.top

    def _on_commit(self, tid, oids):
        # Called by Dobbin, in tid order, in whatever thread committed or
        # caught up: must not raise, and should be quick.
        self.history.add(tid, oids)
        try:
            records = self._handlers.records_of(tid, oids) if len(oids) <= PUSH_OBJECTS else {}
            self.states.changed(tid, oids, records)
            self._broadcast_commit(tid, oids, records)
        except Exception:
            logger.exception("broadcasting transaction %d failed", tid)
            self.states.changed(tid, oids)

    def _broadcast_commit(self, tid, oids, records):
        with self._pub_lock:
            if self._pub is None or tid <= self._last_broadcast:
                return
            sealed, total = [], 0
            for oid, record in records.items():
                if len(record) <= PUSH_RECORD and total + len(record) <= PUSH_TOTAL:
                    total += len(record)
                    mac = self.keyring.sign("o", oid).mac
                    sealed.append([oid, seal(mac, self.instance, tid, record)])
            self.broadcast_seq += 1
            body = protocol.invalidation(self.instance, self.broadcast_seq, tid,
                                         self._last_broadcast, sorted(oids), sealed)
            self._last_broadcast = tid
            send_frames(self._pub, [protocol.TOPIC, self._codec.encode(body)])

    def _broadcast_statics(self, paths):
        with self._pub_lock:
            if self._pub is None:
                return
            self.broadcast_seq += 1
            body = protocol.static_invalidation(self.instance, self.broadcast_seq, paths)
            send_frames(self._pub, [protocol.TOPIC, self._codec.encode(body)])

    def _poller(self):
        while not self._stopping.wait(self.poll_interval):
            with self._pub_lock:
                if self._pub is not None:
                    # ZeroMQ frees what subscribers that left held only when
                    # the socket is used: with no commit to broadcast, the
                    # server kept 11.5 KB for every client that had come.
                    self._pub.getsockopt(zmq.EVENTS)
            try:
                self.sync_database()
            except Exception:
                logger.exception("catching up with %s failed", self.db.path)
