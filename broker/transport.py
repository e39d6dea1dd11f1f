"""The client's sockets: requests with retries, and the broadcast feed.

Requests go through a DEALER socket and follow the lazy pirate pattern: a
request that gets no reply within `timeout` seconds is sent again on a
fresh socket, up to `retries` times, so a server restarted on the same
address is only a delay.  Replies carry the request id; a late reply to an
earlier, abandoned request is dropped.  Broadcasts arrive on a SUB socket
that the owner drains when it chooses (BrokerClient does so at transaction
boundaries), so nothing here runs in a background thread.

Not thread-safe on its own: BrokerClient serializes every call.
"""

import itertools
import threading
import time
import weakref

import zmq
import zmq.utils.z85

from broker import protocol
from broker.codec import Codec
from broker.endpoints import check_tcp_port
from broker.exc import (AddressError, BrokerTimeout, ClientClosed, CurveKeyError, DecodeError,
                        InvalidTypeError, InvalidValueError, ProtocolError)


# Plain ints: pyzmq's enum flags cost microseconds per frame in Python.
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

# Seconds a wait for a reply may go on after the connection is closing.
WAIT_SLICE = 0.1
# Seconds a client busy-waits for the reply to a quick request (see
# protocol.QUICK) before it blocks.  A blocked thread is woken up about as
# slowly as the round trip itself, on a virtual machine above all (here a
# load took 90 us spinning, 150-230 us blocked).  Bounded: the spinning
# thread holds the GIL, and burns what it would have waited anyway.
SPIN = 0.0002
MAX_SPIN = 0.01


# Broadcasts ZeroMQ holds for a client that does not take them (its default,
# 1,000, read ahead; with up to 256 KiB of states each, an idle client grew
# by 270 MB at its next begin()).  Past it they are dropped: the gap in
# their numbers makes the client ask at its next boundary.
BROADCAST_QUEUE = 100


def send_frames(sock, frames):
    """socket.send_multipart(frames), cheaper."""
    send = sock.send
    for frame in frames[:-1]:
        send(frame, _SNDMORE)
    send(frames[-1])


def recv_frames(sock):
    """socket.recv_multipart(), cheaper; raises zmq.Again like it on a timeout."""
    frames = [sock.recv()]
    while sock.getsockopt(_RCVMORE):
        frames.append(sock.recv())
    return frames


def connected(sock, address):
    """Connect `sock` to `address` (ZeroMQ connects in the background:
    only a malformed address fails here)."""
    check_tcp_port(address, "connect to")
    try:
        sock.connect(address)
    except (zmq.ZMQError, TypeError) as error:
        raise AddressError("cannot connect to %r: %s" % (address, error)) from None


def reachable_broadcast(broadcast, address):
    """The endpoint to subscribe to for a server at `address` that bound
    its broadcasts to `broadcast`: a wildcard host (a server bound to all
    interfaces) becomes the host the client reaches the server at."""
    prefix = "tcp://"
    if not (broadcast.startswith(prefix) and address.startswith(prefix)):
        return broadcast
    host, _, port = broadcast[len(prefix):].rpartition(":")
    if host not in ("*", "0.0.0.0", "[::]"):
        return broadcast
    return "%s%s:%s" % (prefix, address[len(prefix):].rpartition(":")[0], port)


def curve_authenticator(context, allow=None):
    """A started CURVE authenticator for `context`'s server sockets: any
    client, or only the public keys in `allow` (bytes or str, Z85)."""
    from zmq.auth.thread import ThreadAuthenticator
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    if allow is None:
        authenticator.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    else:
        authenticator.configure_curve_callback(domain="*", credentials_provider=_AllowList(allow))
    return authenticator


class _AllowList:
    """CURVE credentials provider: only the listed client public keys get in."""

    def __init__(self, keys):
        # ZeroMQ hands the callback the client's key in Z85, whatever form
        # the list gave it in.
        self.keys = {z85_key(key) for key in keys}

    def callback(self, domain, key):
        return key in self.keys


def _checked_key(key):
    """`key` as bytes: 32 of them, or 40 characters of Z85 (bytes or str)."""
    if isinstance(key, str):
        key = key.encode("ascii", "replace")
    if not isinstance(key, bytes) or len(key) not in (32, 40):
        raise CurveKeyError("a CURVE key is 32 bytes or 40 Z85 characters, not %r" % (key,))
    return key


def z85_key(key):
    """CURVE key `key` (see `_checked_key`) in its 40 Z85 characters."""
    key = _checked_key(key)
    return zmq.utils.z85.encode(key) if len(key) == 32 else key


def set_curve_key(sock, option, key):
    """Set CURVE key `option` of `sock` to `key`: 32 bytes, or 40
    characters of Z85 (bytes or str)."""
    key = _checked_key(key)
    try:
        sock.setsockopt(option, key)
    except zmq.ZMQError as error:
        raise CurveKeyError("a CURVE key was refused: %s" % error) from None


def check_duration(name, value):
    """`value`, a positive number of seconds; TypeError or ValueError otherwise."""
    if type(value) not in (int, float):
        raise InvalidTypeError("%s is a number of seconds, not %r" % (name, value))
    if not 0 < value < float("inf"):
        raise InvalidValueError("%s must be a positive number of seconds, not %r" % (name, value))
    return value


def check_spin(value):
    """`value`, seconds to busy-wait for a quick reply: 0 (never) up to MAX_SPIN."""
    if type(value) not in (int, float):
        raise InvalidTypeError("spin is a number of seconds, not %r" % (value,))
    if not 0 <= value <= MAX_SPIN:
        raise InvalidValueError("spin must be from 0 to %r seconds, not %r" % (MAX_SPIN, value))
    return value


class UseLock:
    """A client's lock, held by every use of the client: taken once the
    client is closed, it raises ClientClosed (cached reads included)."""

    __slots__ = ("rlock", "closed")

    def __init__(self):
        self.rlock = threading.RLock()
        self.closed = False

    def __enter__(self):
        self.rlock.acquire()
        if self.closed:
            self.rlock.release()
            raise ClientClosed("the client is closed")

    def __exit__(self, *exc_info):
        self.rlock.release()


class Connection:
    """One client's DEALER and SUB sockets to one server address."""

    def __init__(self, address, codec, timeout=2.5, retries=3, curve=None, trace=None,
                 spin=SPIN):
        if type(retries) is not int or retries < 0:
            raise InvalidValueError("retries is a number of retries (an int >= 0), not %r"
                                    % (retries,))
        self.address = address
        self.codec = codec
        self.timeout = check_duration("timeout", timeout)
        self.spin = check_spin(spin)
        self.retries = retries
        self.curve = curve
        self.trace = trace
        self.reconnects = 0
        self._broadcast_codec = Codec()
        self._context = zmq.Context()
        # Open sockets, closed with the context by close() or, for a
        # connection dropped unclosed, when it is collected: left to the
        # cyclic collector, pyzmq would end the context with the sockets
        # still open, and wait for them for ever.
        self._sockets = []
        self._shutdown = weakref.finalize(self, _shutdown, self._context, self._sockets)
        self._ids = itertools.count(1)
        self._dealer = None
        self._sub = None
        self._sub_endpoint = None
        self._closed = False
        # Set by another thread than the one using the connection: a wait
        # for a reply then ends within WAIT_SLICE, with ClientClosed.
        self.closing = False
        self._connect()

    def _secure(self, sock):
        if self.curve is not None:
            try:
                server_key, public, secret = self.curve
            except (TypeError, ValueError):
                raise CurveKeyError("curve is (server public key, client public key, "
                                    "client secret key), not %r" % (self.curve,)) from None
            set_curve_key(sock, zmq.CURVE_SERVERKEY, server_key)
            set_curve_key(sock, zmq.CURVE_PUBLICKEY, public)
            set_curve_key(sock, zmq.CURVE_SECRETKEY, secret)

    def _socket(self, kind, replacing=None):
        if replacing is not None:
            self._sockets.remove(replacing)
            replacing.close(0)
        sock = self._context.socket(kind)
        self._sockets.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        self._secure(sock)
        return sock

    def _connect(self):
        self._dealer = self._socket(zmq.DEALER, replacing=self._dealer)
        # A blocking receive with a timeout costs one wake-up less than
        # poll + recv; in slices, so that a close() from another thread
        # ends the wait soon (a reply ends it at once whatever the slice).
        self._dealer.setsockopt(zmq.RCVTIMEO, max(1, int(min(self.timeout, WAIT_SLICE) * 1000)))
        connected(self._dealer, self.address)

    def subscribe(self, endpoint):
        """Listen to the broadcasts at `endpoint` (reconnects if it changed)."""
        endpoint = reachable_broadcast(endpoint, self.address)
        if endpoint == self._sub_endpoint:
            return
        self._sub = self._socket(zmq.SUB, replacing=self._sub)
        self._sub.setsockopt(zmq.RCVHWM, BROADCAST_QUEUE)
        self._sub.setsockopt(zmq.SUBSCRIBE, protocol.TOPIC)
        self._connect_and_wait(self._sub, endpoint)
        self._sub_endpoint = endpoint

    def _connect_and_wait(self, sub, endpoint):
        # A PUB socket drops what it sends before our subscription reaches
        # it, so a commit made right after we connect would be missed (the
        # client stays correct, but learns of it only at its next begin()).
        # Wait, up to the request timeout, for the handshake: the
        # subscription follows it at once.
        monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            connected(sub, endpoint)
            if monitor.poll(int(self.timeout * 1000)):
                monitor.recv_multipart()
        finally:
            sub.disable_monitor()
            monitor.close(0)

    def request(self, op, fields, while_waiting=None):
        """Send one request; return (server instance, ok, result or error wire).

        `fields` is a dict of the op's fields, which becomes the request
        body (id and op are added to it).  `while_waiting`, if given, is
        called once the request is sent, to do some work while the server
        does its own.  Raises BrokerTimeout once every retry went unanswered.
        """
        if self._closed or self.closing:
            raise ClientClosed("the client is closed")
        rid = next(self._ids)
        fields["id"] = rid
        fields["op"] = op
        frames = [b"", protocol.MAGIC, self.codec.encode(fields)]
        for attempt in range(self.retries + 1):
            if attempt:
                self.reconnects += 1
                self._connect()
            if self.trace is not None:
                self.trace("send", frames)
            send_frames(self._dealer, frames)
            if while_waiting is not None and not attempt:
                while_waiting()
            reply = self._await(rid, self.spin if op in protocol.QUICK else 0)
            if reply is not None:
                return reply
        # The last attempt's socket still holds the request: ZeroMQ would
        # deliver it once the server answers again, and a commit the caller
        # was told failed would be applied.  A new socket drops it.
        self._connect()
        raise BrokerTimeout("no reply from %s to %s after %d attempt(s) of %.1f s"
                            % (self.address, op, self.retries + 1, self.timeout))

    def _await(self, rid, spin=0):
        dealer = self._dealer
        if spin:
            until = time.perf_counter() + spin
            events = dealer.getsockopt
            while not events(_EVENTS) & _POLLIN and time.perf_counter() < until:
                pass
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                frames = recv_frames(dealer)
            except zmq.Again:
                if self.closing:
                    raise ClientClosed("the client was closed while it waited for a reply "
                                       "from %s: what the request did is unknown"
                                       % self.address) from None
                if time.monotonic() >= deadline:
                    return None
                continue
            if self.trace is not None:
                self.trace("recv", frames)
            if len(frames) != 3 or frames[0] != b"" or frames[1] != protocol.MAGIC:
                raise ProtocolError("malformed reply frames from %s" % self.address)
            reply_id, server, ok, result = protocol.check_reply(self.codec.decode(frames[2]))
            if reply_id == rid:
                return server, ok, result
            # A late reply to an abandoned request (or to a garbled one):
            # dropped, and ours awaited for the rest of the timeout.

    def broadcasts(self, timeout=0):
        """Return the broadcasts waiting (decoded), waiting up to `timeout` s for one."""
        if self._sub is None or self._closed:
            return []
        received = []
        sub = self._sub
        if timeout and not sub.poll(int(timeout * 1000)):
            return received
        # Checking the socket's events is much cheaper than a poll.
        while sub.getsockopt(_EVENTS) & _POLLIN:
            frames = recv_frames(sub)
            if self.trace is not None:
                self.trace("broadcast", frames)
            if len(frames) != 2 or frames[0] != protocol.TOPIC:
                continue
            try:
                received.append(protocol.check_broadcast(self._broadcast_codec.decode(frames[1])))
            except (ProtocolError, DecodeError):
                continue  # a garbled broadcast is a lost one: the gap check copes
        return received

    def close(self):
        self._closed = True
        self._shutdown()  # once only


def _shutdown(context, sockets):
    for sock in sockets:
        sock.close(0)
    sockets.clear()
    context.term()
