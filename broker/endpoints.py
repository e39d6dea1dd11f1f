"""The server's endpoints: binding them, and holding an ipc:// path.

ZeroMQ binds an ipc:// path by first deleting whatever is there, and two
servers that checked the path at the same moment would both bind it, the
second taking the first's clients.  So a server binding ipc://PATH first
takes an exclusive flock on PATH.lock, held until it has closed its
socket and removed PATH; only then does it check what is at PATH.
A crashed server's lock goes with its process; its files stay, and the
next server takes them over.
"""

import contextlib
import fcntl
import os
import socket
import stat

import zmq
from zope.interface import implementer

from broker.exc import AddressError
from broker.interfaces import IBinding


@implementer(IBinding)
class Binding:
    """An endpoint a socket was bound to, and for ipc:// the path and
    lock it holds until `release()`, called once the socket is closed."""

    def __init__(self, endpoint, path=None, lock_fd=None):
        self.endpoint = endpoint
        self._path = path
        self._lock_fd = lock_fd

    def release(self):
        """Remove the socket file and the lock file, then give up the lock
        (in that order: whoever takes the lock next finds neither)."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        _unlock(self._path, self._lock_fd)
        self._lock_fd = None


def bind(sock, address):
    """Bind `sock` to `address`; return its Binding, whose endpoint has the
    port chosen for a "*".  AddressError if the address is taken or bad."""
    check_tcp_port(address, "bind")
    path = _ipc_path(address)
    lock_fd = None if path is None else _lock_ipc_path(address, path)
    try:
        if path is not None:
            _check_ipc_path_free(address, path)
        try:
            sock.bind(address)
        except zmq.ZMQError as error:
            raise AddressError("cannot bind %r: %s" % (address, error)) from None
    except BaseException:
        if lock_fd is not None:
            _unlock(path, lock_fd)
        raise
    return Binding(sock.getsockopt(zmq.LAST_ENDPOINT).decode(), path, lock_fd)


def check_bindable(address):
    """AddressError, as `bind` raises it, unless `address` can be bound
    now: asked before anything is made for a server there.  Only a check:
    another may take the address before the server binds it."""
    context = zmq.Context()
    try:
        sock = context.socket(zmq.ROUTER)
        binding = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            binding = bind(sock, address)
        finally:
            sock.close(0)
            if binding is not None:
                binding.release()
    finally:
        context.term()


def check_tcp_port(address, action):
    """AddressError unless a tcp:// `address` ends in a port ZeroMQ takes
    as written: "*", or 0 to 65535.  ZeroMQ itself wraps 70000 to 4464
    and reads "-1" as 65535, so a server would listen where no one looks."""
    if type(address) is not str or not address.startswith("tcp://"):
        return
    port = address.rpartition(":")[2]
    if port == "*" or (port.isdigit() and port.isascii() and int(port) <= 65535):
        return
    raise AddressError("cannot %s %r: a tcp address ends in :PORT, a port from 0 to 65535, "
                       "or :* for any free port" % (action, address))


def _unlock(path, lock_fd):
    """Remove `path`.lock, then give up the lock held on it (in that order:
    whoever takes the lock next finds no stale file)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + ".lock")
    os.close(lock_fd)


def _ipc_path(address):
    """The file an ipc:// `address` names, or None (no file: another
    transport, Linux's abstract namespace, or a name ZeroMQ makes up)."""
    if type(address) is not str or not address.startswith("ipc://"):
        return None
    path = address[len("ipc://"):]
    if path.startswith("@") or path == "*":
        return None
    return path


def _lock_ipc_path(address, path):
    """An fd holding the exclusive flock on `path`.lock, or AddressError."""
    lock_path = path + ".lock"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise AddressError("cannot bind %r: cannot open %s: %s"
                               % (address, lock_path, error.strerror)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AddressError("cannot bind %r: Address already in use (a server holds %s)"
                               % (address, lock_path)) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            opened, named = os.fstat(fd), os.stat(lock_path)
        except FileNotFoundError:
            named = None
        if named is not None and (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino):
            return fd
        # The holder removed it as we opened it: the lock is on a file
        # nobody else will open.  Take the one at the path now.
        os.close(fd)


def _check_ipc_path_free(address, path):
    """AddressError unless binding ipc:// `address` harms nothing: a
    database file named by mistake would be deleted, and a server that
    does not lock (another program) would lose its clients.  Only a
    socket file that nothing listens on, left by a crash, may go."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # nothing there (or nothing we can see: then the bind fails)
    if not stat.S_ISSOCK(mode):
        raise AddressError("cannot bind %r: %s exists and is not a socket (binding would "
                           "delete it)" % (address, path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # no listener: a socket file left behind
    finally:
        probe.close()
    raise AddressError("cannot bind %r: Address already in use (a server listens there)"
                       % address)


def broadcast_address_for(address):
    """The PUB endpoint a server at `address` binds unless told another."""
    if type(address) is not str:
        raise AddressError("an address is a str, not %r" % (address,))
    if address.startswith("ipc://") or address.startswith("inproc://"):
        return address + ".pub"
    if address.startswith("tcp://"):
        host = address[len("tcp://"):].rsplit(":", 1)[0]
        return "tcp://%s:*" % host
    raise AddressError("cannot derive a broadcast endpoint from %r; pass broadcast="
                       % address)
