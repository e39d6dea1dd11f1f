"""broker.serverside: statics, and changes the server's own code makes."""

import io
import threading

import pytest
import transaction
import zmq
from zope.interface.verify import verifyObject

from broker import exc
from broker.interfaces import IStatics
from broker.client import BrokerClient
from broker.serverside import Statics, checked_path
from broker_fixtures import (TIMEOUT, Item, TestServer, broker, configure,  # noqa: F401
                             make_database, wait_until)
from dobbin.btree import OOBTree
from dobbin.persistent import PersistentDict, PersistentFile, checkout


class Status:
    def __init__(self, health):
        self.health = health


class Guarded(Item):
    @property
    def locked(self):
        return True


def test_statics_map_paths_to_objects_and_objects_to_their_first_path():
    statics, one, two = Statics(), Status("one"), Status("two")
    assert verifyObject(IStatics, statics)
    assert statics.add(one, ("a",)) is None and statics.add(one, ("b",)) is None
    assert statics.path_of(one) == ("a",) and statics.get(["b"]) is one
    assert statics.remove(("a",)) is one
    assert statics.path_of(one) == ("b",)  # still served at "b": removing "a" forgot it
    assert statics.add(two, ("b",)) is one
    assert statics.path_of(one) is None  # replaced: its id() may be another's later
    with pytest.raises(KeyError, match="no static object at"):
        statics.remove(("a",))
    with pytest.raises(KeyError):
        statics.get(("a",))


@pytest.mark.parametrize("path", [(), ("x" * 257,), tuple("abcdefghijklmnopq"), (True,),
                                  (2 ** 70,), (1.5,), (None,)])
def test_a_path_no_key_can_carry_is_refused(path):
    # They were accepted, and client.static() then failed.
    with pytest.raises(exc.ExportError, match="static key path"):
        checked_path(path)
    assert checked_path(["x" * 256, -2 ** 63, "b"]) == ("x" * 256, -2 ** 63, "b")


def test_replacing_or_removing_a_static_is_broadcast(broker):
    _db, server, connect = broker
    server.add_static(Status("OK"), "status")
    client = connect()
    proxy = client.static("status")
    assert proxy.health == "OK"
    server.add_static(Status("DOWN"), "status")
    assert wait_until(lambda: client.wait_for_broadcast(timeout=0.1) or client.abort()
                      or client.static("status").health == "DOWN")
    server.del_static("status")
    client.wait_for_broadcast(timeout=1)
    client.abort()
    with pytest.raises(KeyError):
        client.static("status")


def test_an_update_that_would_make_a_static_unsendable_is_undone_and_refused(broker):
    # It was accepted and broadcast; then no client could load the static.
    _db, server, connect = broker
    status = Status("OK")
    server.add_static(status, "status")
    with pytest.raises(exc.ProtocolError, match="would leave .*Status unsendable: an object "
                                                "of type object is neither stored nor static"):
        server.obj_update(status, health="DOWN", since=object())
    assert status.health == "OK" and not hasattr(status, "since")
    assert connect().static("status").health == "OK"


def test_server_code_stores_a_file_that_clients_then_read(broker):
    # It was refused as unsendable: a stored file is a stream only once committed.
    db, server, connect = broker
    server.obj_update(db.root.item, cover=PersistentFile(io.BytesIO(b"cover")))
    assert connect().root.item.cover.read() == b"cover"
    with pytest.raises(exc.ProtocolError, match="a stream can be sent only as an attribute"):
        server.obj_update(db.root.item, covers=[db.root.item.cover])
    assert not hasattr(db.root.item, "covers")


def test_obj_update_refuses_private_names(broker):
    # _p_oid=999 was accepted: the next open called the file corrupt.
    db, server, _connect = broker
    for name in ("_p_oid", "_secret"):
        with pytest.raises(exc.ExportError, match="private name"):
            server.obj_update(db.root.item, **{name: 1})
    with pytest.raises(exc.ExportError):
        server.obj_new(Item, _p_jar=None)
    assert db.root.item._p_oid is not None and not hasattr(db.root.item, "_secret")


def test_a_failed_obj_update_or_obj_delete_leaves_nothing_behind(broker):
    db, server, connect = broker
    checkout(db.root)
    db.root.guarded = Guarded("g")
    transaction.commit()
    guarded, item = db.root.guarded, db.root.item
    with pytest.raises(AttributeError):
        server.obj_update(guarded, name="half", locked=False)
    with pytest.raises(KeyError):
        server.obj_delete(db.root.things, "missing")
    # A client changes things meanwhile: nothing of ours still has it checked out.
    client = connect()
    client.root.things["client"] = "theirs"
    client.commit()
    server.obj_update(item, name="unrelated")
    assert guarded.name == "g" and item.name == "unrelated"
    assert dict(db.root.things) == {"client": "theirs"}
    # A refused commit leaves no failed transaction behind either.
    with pytest.raises(exc.ProtocolError, match="unsendable"):
        server.obj_update(item, name=object())
    server.obj_update(item, name="works")
    assert item.name == "works"


def test_a_refused_obj_update_keeps_what_the_thread_had_pending(broker):
    # It aborted the whole transaction: an object made by obj_new before
    # lost its state, and was then stored empty.
    db, server, connect = broker
    made = server.obj_new(Item, name="made")
    before = db.root.item.name
    with pytest.raises(exc.ProtocolError, match="unsendable"):
        server.obj_update(db.root.item, name=object())
    assert made.name == "made" and db.root.item.name == before
    server.obj_update(db.root, made=made)
    client = connect()
    assert client.root.made.name == "made"
    client.close()


class ChangingServer(TestServer):
    __test__ = False

    def do_update_then_fail(self):
        self.obj_update(self.db.root.item, name="updated by a failed call")
        raise ValueError("failed after the update")

    def do_store_unsendable(self):
        self.obj_update(self.db.root.item, name=object())

    def do_make(self):
        made = self.obj_new(Item, name="made")
        self.obj_update(self.db.root, made=made)
        return made

    def do_shutdown(self):
        self.stop()
        return "stopping"


@pytest.fixture
def changing(tmp_path):
    db = make_database(str(tmp_path / "c.dobbin"))
    server = configure(ChangingServer(db, address="tcp://127.0.0.1:*"))
    server.start()
    client = BrokerClient(server.address, timeout=TIMEOUT)
    yield db, server, client
    client.close()
    server.stop()
    db.close()


def test_changes_inside_a_call_join_its_transaction(changing):
    # obj_update committed on its own: a call failing afterwards had
    # changed the database all the same, and unsendable values got in.
    db, server, client = changing
    tid = db.last_tid
    with pytest.raises(exc.RemoteError, match="failed after the update"):
        client.call("update_then_fail")
    with pytest.raises(exc.ProtocolError, match="unsendable"):
        client.call("store_unsendable")
    assert db.last_tid == tid and db.root.item.name == "first"
    made = client.call("make")
    client.begin()
    assert made.name == "made" and db.last_tid == tid + 1  # one transaction


def test_obj_new_makes_working_mappings(broker):
    db, server, connect = broker
    for cls in (PersistentDict, OOBTree):
        mapping = server.obj_new(cls)
        mapping["k"] = 1  # checked out by obj_new
        server.obj_update(db.root, **{cls.__name__.lower(): mapping})
    client = connect()
    assert dict(client.root.persistentdict.items()) == {"k": 1}
    assert dict(client.root.oobtree.items()) == {"k": 1}


def test_export_class_while_running_is_refused(broker):
    # Its states went out, and were cached, by the old rules.
    _db, server, _connect = broker
    with pytest.raises(exc.ExportError, match="before start"):
        server.export_class(Item, hidden="name")


def test_stop_from_a_method_the_server_runs(changing):
    _db, server, client = changing
    assert client.call("shutdown") == "stopping"
    assert wait_until(lambda: not any(t.name.startswith("broker") for t in threading.enumerate()))
    assert not server._running


def test_a_start_that_fails_after_binding_leaves_the_address_free(tmp_path):
    db = make_database(str(tmp_path / "s.dobbin"))
    server = configure(TestServer(db, address="tcp://127.0.0.1:*"))
    server.start()
    address = server.address
    server.stop()
    db.close()
    server.requested_address = address
    with pytest.raises(Exception, match="closed"):
        server.start()  # its database sync fails, after the sockets were bound
    server.stop()
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    try:
        sock.bind(address)  # free: nothing of the failed start holds it
    finally:
        sock.close(0)
        context.term()


class StatusServer(TestServer):
    """Changes its statics inside calls, which may then fail."""

    __test__ = False

    def do_degrade(self, fail):
        self.obj_update(self.static_object(["status"]), health="degraded")
        self.obj_delete(self.static_object(["flags"]), "maintenance")
        self.obj_update(self.db.root.item, name="changed")
        if fail:
            raise ValueError("failed after its changes")
        return "degraded"


@pytest.fixture
def status_server(tmp_path):
    db = make_database(str(tmp_path / "d.dobbin"))
    server = configure(StatusServer(db, address="ipc://%s/s.sock" % tmp_path))
    server.add_static(Status("OK"), "status")
    server.add_static({"maintenance": False}, "flags")
    server.start()
    try:
        yield db, server
    finally:
        server.stop()
        db.close()


def test_static_changes_of_a_call_that_fails_are_undone_with_the_rest(status_server):
    # The persistent change was rolled back, the static one kept and broadcast.
    db, server = status_server
    client = BrokerClient(server.address, timeout=TIMEOUT)
    try:
        with pytest.raises(exc.RemoteError, match="failed after its changes"):
            client.call("degrade", True)
        assert server.static_object(["status"]).health == "OK"
        assert server.static_object(["flags"]) == {"maintenance": False}
        assert db.root.item.name == "first"
        assert client.call("degrade", False) == "degraded"
        assert server.static_object(["status"]).health == "degraded"
        assert server.static_object(["flags"]) == {}
        assert wait_until(lambda: client.wait_for_broadcast(timeout=0.1) or client.abort()
                          or client.static("status").health == "degraded")
    finally:
        client.close()


def test_a_static_asked_for_by_path_keeps_that_path(broker):
    # static("alias") answered the key of the object's first path: once
    # another object took that path, the proxy showed it.
    _db, server, connect = broker
    shared = Status("A")
    server.add_static(shared, "primary")
    server.add_static(shared, "alias")
    client = connect()
    alias = client.static("alias")
    server.add_static(Status("B"), "primary")
    client.wait_for_broadcast(timeout=1)
    client.abort()
    assert alias.health == "A" and client.static("primary").health == "B"


def test_an_unstored_persistent_object_is_not_made_static(broker):
    # Clients got a key they could not load, and a commit referring to it
    # stored it as a side effect.
    _db, server, _connect = broker
    with pytest.raises(exc.ExportError, match="not stored"):
        server.add_static(PersistentDict(), "settings")
