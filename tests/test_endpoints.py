"""broker.endpoints: binding, and holding an ipc:// path while bound."""

import fcntl
import os
import signal
import socket

import pytest
import zmq
from zope.interface.verify import verifyObject

from broker.endpoints import bind, broadcast_address_for, check_bindable
from broker.exc import AddressError
from broker.interfaces import IBinding
from broker_fixtures import run_python


@pytest.fixture
def sockets():
    context = zmq.Context()
    made = []

    def make():
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close(0)
    context.term()


def _listening(path):
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_binding_an_address_twice_is_an_address_error(sockets):
    binding = bind(sockets(), "tcp://127.0.0.1:*")
    endpoint = binding.endpoint
    assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")
    with pytest.raises(AddressError, match="cannot bind .*in use"):
        bind(sockets(), endpoint)
    binding.release()  # nothing to give back for tcp://


def test_an_address_is_checked_bindable_and_left_free(tmp_path, sockets):
    binding = bind(sockets(), "tcp://127.0.0.1:*")
    with pytest.raises(AddressError, match="cannot bind .*in use"):
        check_bindable(binding.endpoint)
    path = tmp_path / "served"
    check_bindable("ipc://%s" % path)
    assert os.listdir(tmp_path) == []  # no socket file, no lock file
    bind(sockets(), "ipc://%s" % path).release()
    with pytest.raises(AddressError, match="a port from 0 to 65535"):
        check_bindable("tcp://127.0.0.1:70000")


@pytest.mark.parametrize("port", ["70000", "-1", "5555x", "\u0665", ""])
def test_a_tcp_port_zeromq_would_read_otherwise_is_an_address_error(sockets, port):
    # ZeroMQ binds 70000 as 4464 and -1 as 65535: a server nobody finds.
    with pytest.raises(AddressError, match="a port from 0 to 65535"):
        bind(sockets(), "tcp://127.0.0.1:" + port)


def test_an_ipc_path_is_held_from_bind_to_release_and_then_free(tmp_path, sockets):
    # ZeroMQ itself would take the path over: the first socket's clients
    # would reach the second.
    first = sockets()
    binding = bind(first, "ipc://%s/s.sock" % tmp_path)
    assert verifyObject(IBinding, binding)
    endpoint = binding.endpoint
    assert sorted(os.listdir(tmp_path)) == ["s.sock", "s.sock.lock"]
    with pytest.raises(AddressError, match="cannot bind .*in use"):
        bind(sockets(), endpoint)
    first.close(0)
    binding.release()
    assert os.listdir(tmp_path) == []
    second = bind(sockets(), endpoint)
    assert second.endpoint == endpoint
    second.release()


def test_a_path_locked_by_a_server_still_starting_is_not_taken(tmp_path, sockets):
    # Between a server's lock and its bind nothing listens yet: a second
    # server that only looked for a listener bound the path too.
    path = tmp_path / "s.sock"
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(AddressError, match="in use .*s.sock.lock"):
            bind(sockets(), "ipc://%s" % path)
        assert not path.exists()
    finally:
        os.close(fd)


def test_a_crashed_servers_files_are_taken_over(tmp_path, sockets):
    # Its lock went with its process; its socket file has no listener.
    endpoint = "ipc://%s/s.sock" % tmp_path
    crashed = run_python(
        "import os, signal, zmq\n"
        "from broker.endpoints import bind\n"
        "bind(zmq.Context().socket(zmq.ROUTER), %r)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n" % endpoint)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert sorted(os.listdir(tmp_path)) == ["s.sock", "s.sock.lock"]
    taken = bind(sockets(), endpoint)
    assert _listening(str(tmp_path / "s.sock"))
    taken.release()
    assert os.listdir(tmp_path) == []


def test_a_lock_file_removed_while_being_locked_is_not_trusted(tmp_path, sockets, monkeypatch):
    # The holder releases between our open and our flock: the lock we got
    # is on a file nobody else opens, so we lock the path's new file.
    path = tmp_path / "s.sock"
    real_flock = fcntl.flock
    removed = []

    def flock_after_removal(fd, operation):
        if not removed:
            removed.append(True)
            os.unlink(str(path) + ".lock")
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_removal)
    binding = bind(sockets(), "ipc://%s" % path)
    monkeypatch.undo()
    fd = os.open(str(path) + ".lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    binding.release()


@pytest.mark.parametrize("name", ["data.dobbin", "a directory"])
def test_binding_an_ipc_path_that_is_no_socket_leaves_it_alone(tmp_path, name, sockets):
    # ZeroMQ deletes whatever is at the path: `dobbin serve data.dobbin
    # --bind ipc://data.dobbin` deleted the database it served.
    path = tmp_path / name
    if name == "a directory":
        path.mkdir()
    else:
        path.write_bytes(b"precious")
    with pytest.raises(AddressError, match="exists and is not a socket"):
        bind(sockets(), "ipc://%s" % path)
    assert path.is_dir() if name == "a directory" else path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == [name]  # no lock file left behind


def test_a_bind_zeromq_refuses_leaves_no_lock_file(tmp_path, sockets):
    with pytest.raises(AddressError, match="cannot bind"):
        bind(sockets(), "ipc://%s/%s" % (tmp_path, "s" * 120))  # past a socket name's limit
    assert os.listdir(tmp_path) == []


def test_an_ipc_path_in_a_directory_that_cannot_be_written_is_an_address_error(sockets):
    with pytest.raises(AddressError, match="cannot open /proc/.*lock"):
        bind(sockets(), "ipc:///proc/no-such-dir/s.sock")


@pytest.mark.parametrize("address, expected", [
    ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:*"),
    ("ipc:///tmp/x.sock", "ipc:///tmp/x.sock.pub"),
    ("inproc://name", "inproc://name.pub"),
])
def test_the_broadcast_endpoint_follows_the_request_endpoint(address, expected):
    assert broadcast_address_for(address) == expected


@pytest.mark.parametrize("address", [None, 5, "udp://127.0.0.1:1"])
def test_no_broadcast_endpoint_is_made_up_for_other_addresses(address):
    with pytest.raises(AddressError):
        broadcast_address_for(address)
