"""Helpers and model classes for the broker's tests.

The model classes live here (not in test modules) so that server processes
started by the tests can import them: they run with this directory on
PYTHONPATH.  Every server a test starts is stopped by the test (the
`served` context manager and the `broker` fixture see to it); addresses are
127.0.0.1 or ipc:// only.
"""

import contextlib
import os
import subprocess
import sys
import time

import pytest
import transaction

from broker.client import BrokerClient
from broker.export import exported
from broker.outcomes import COMMIT_MARK
from broker.server import BrokerServer
from conftest import child_env  # noqa: F401 (for the tests importing it from here)
from dobbin.btree import OOBTree
from dobbin.database import Database
from dobbin.persistent import Persistent, PersistentDict, checkout

TIMEOUT = 1.0


class Item(Persistent):
    """A small exported object with a hidden field and an exported method."""

    name = None
    secret = None
    renames = 0

    def __init__(self, name, secret=None):
        self.name = name
        self.secret = secret

    @exported
    def shout(self, suffix="!"):
        return self.name.upper() + suffix

    @exported
    def rename(self, name):
        """An exported write, counting its runs."""
        checkout(self)
        self.name = name
        self.renames += 1
        return name

    def internal(self):
        return "not exported"


class Folder(Persistent):
    """A root: a name, an Item, a PersistentDict and a B-tree."""

    def __init__(self):
        self.title = "root"
        self.item = Item("first", secret="hidden-value-1234")
        self.things = PersistentDict()
        self.tree = OOBTree()


class Profile(PersistentDict):
    """A mapping whose "password" item is hidden from clients."""


def configure(server):
    """The export configuration every test server uses."""
    server.export_class(Item, hidden="secret", creatable=True)
    server.export_class(Folder)
    server.export_class(PersistentDict)
    server.export_class(OOBTree)
    server.export_class(Profile, hidden="password")
    return server


def configure_dying_after_commit(server):
    """`configure`, and die inside the first commit a client makes: once it
    is durable, before its reply is sent (as a server killed then would)."""
    configure(server)
    db = server.db

    def die(_tid, _oids):
        if COMMIT_MARK in db.recent_transactions(1)[0].extension:
            os._exit(3)

    db.subscribe(die)
    return server


class TestServer(BrokerServer):
    """A server with application calls."""

    __test__ = False

    def do_hello(self, who):
        return "hello " + who

    def do_fail(self):
        raise ValueError("deliberate failure")

    def do_rename(self, name):
        return self.db.root.item.rename(name)

    def do_sleep(self, seconds):
        time.sleep(seconds)  # holds a worker, as a slow application call does


def make_database(path):
    """Create a database at `path` with a Folder root; return it open."""
    db = Database(path, durability="none")
    if db.root is None:
        root = Folder()
        checkout(root)
        db.elect(root)
        transaction.commit()
    return db


@contextlib.contextmanager
def served(db, address="tcp://127.0.0.1:*", **options):
    """Run a configured TestServer on `db` for the duration of the block."""
    server = configure(TestServer(db, address=address, **options))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def broker(tmp_path):
    """(db, server, client factory); everything is closed after the test."""
    db = make_database(str(tmp_path / "test.dobbin"))
    clients = []

    def connect(**options):
        options.setdefault("timeout", TIMEOUT)
        client = BrokerClient(server.address, **options)
        clients.append(client)
        return client

    with served(db) as server:
        try:
            yield db, server, connect
        finally:
            for client in clients:
                client.close()
            transaction.abort()
    db.close()


def run_python(code, timeout=30):
    """Run `code` in a new Python process that can import dobbin, broker and these models."""
    return subprocess.run([sys.executable, "-c", code], env=child_env(), timeout=timeout,
                          capture_output=True, text=True)


class ServerProcess:
    """`dobbin serve PATH --bind ADDRESS` in a child process, with this module's classes."""

    def __init__(self, path, address, app="broker_fixtures:configure"):
        self.path = path
        self.address = address
        self.app = app
        self.process = None

    def start(self):
        code = ("import broker_fixtures, sys; from dobbin.cli import main; "
                "sys.exit(main(['serve', %r, '--bind', %r, '--app', %r]))"
                % (self.path, self.address, self.app))
        self.process = subprocess.Popen([sys.executable, "-c", code], env=child_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline()
        if "serving" not in line:
            self.stop()
            raise RuntimeError("server did not start: %r %s" % (line, self.process.stderr.read()))
        return self

    def kill(self):
        self.process.kill()
        self.process.wait(10)
        self._close_pipes()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._close_pipes()
        return self.process.returncode

    def _close_pipes(self):
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def wait_until(predicate, timeout=5.0):
    """Poll `predicate` until it is true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def newest_thing(server):
    """Server method used by tests: the most recently added PersistentDict item, live."""
    things = server.db.root.things
    return things[sorted(things)[-1]] if len(things) else None


TestServer.do_newest = newest_thing
