"""broker.client and broker.proxy against a real server on loopback, and real processes."""

import contextlib
import gc
import io
import threading

import pytest
import transaction
from zope.interface.verify import verifyObject

from broker import exc
from broker.interfaces import IBrokerClient, IProxy, IRemoteStream
from broker.keys import Key
from broker.outcomes import COMMIT_MARK
from broker.proxy import STREAM_CHUNK, MappingProxy, Proxy
from broker_fixtures import (TIMEOUT, BrokerClient, Item, ServerProcess, TestServer,  # noqa
                             broker, configure, make_database, run_python, served, wait_until)
from dobbin.database import Database
from dobbin.persistent import PersistentFile, checkout


def test_implements_interfaces(broker):
    _db, _server, connect = broker
    client = connect()
    assert verifyObject(IBrokerClient, client)
    assert verifyObject(IProxy, client.root)


def test_reading_follows_references_with_one_proxy_per_key(broker):
    _db, _server, connect = broker
    root = connect().root
    assert root.title == "root"
    assert root.item.name == "first"
    assert root.item is root.item
    assert "oid" in repr(root.item)
    with pytest.raises(AttributeError):
        root.missing
    with pytest.raises(AttributeError):
        root.item.internal  # a method, not exported
    assert root.item.shout("?") == "FIRST?"


def test_two_clients_commit_and_begin(broker):
    _db, _server, connect = broker
    one, two = connect(), connect()
    assert two.root.item.name == "first"
    one.root.item.name = "changed"
    assert one.root.item.name == "changed"      # visible locally at once
    assert two.root.item.name == "first"
    tid = one.commit()
    assert tid == one.tid
    assert two.root.item.name == "first"        # two's transaction is still running
    two.wait_for_broadcast(tid)
    assert two.root.item.name == "first"        # even with the invalidation received
    two.begin()
    assert two.root.item.name == "changed"


def test_uncached_reads_return_the_snapshot_version(broker):
    _db, _server, connect = broker
    one, two = connect(), connect()
    two.root.title  # two's snapshot is taken; root cached, item not loaded yet
    one.root.item.name = "later"
    one.commit()
    assert two.root.item.name == "first"
    two.begin()
    assert two.root.item.name == "later"


def test_version_missing_at_snapshot_is_a_read_conflict(broker):
    _db, _server, connect = broker
    one, two = connect(), connect()
    two.root.title
    one.root.things["new"] = one.new("broker_fixtures.Item", name="born later")
    one.commit()
    newest = two.call("newest")  # a live reference, newer than two's snapshot
    with pytest.raises(exc.ReadConflictError, match="begin"):
        newest.name
    two.begin()
    assert newest.name == "born later"


def test_conflict_rolls_back_local_changes(broker):
    _db, _server, connect = broker
    one, two = connect(), connect()
    one.root.item.name = "one"
    two.root.item.name = "two"
    two.root.title = "two's title"
    one.commit()
    with pytest.raises(exc.ConflictError) as info:
        two.commit()
    assert info.value.field == "name" and "oid" in info.value.key
    two.begin()
    assert two.root.item.name == "one"
    assert two.root.title == "root"   # the whole commit was refused
    two.root.item.name = "two again"
    two.commit()
    one.begin()
    assert one.root.item.name == "two again"


def test_changes_to_different_fields_do_not_conflict(broker):
    _db, _server, connect = broker
    one, two = connect(), connect()
    one.root.item.name = "one"
    two.root.title = "two"
    one.commit()
    two.commit()
    one.begin()
    assert (one.root.item.name, one.root.title) == ("one", "two")


def test_abort_drops_local_changes(broker):
    _db, _server, connect = broker
    client = connect()
    client.root.title = "draft"
    client.abort()
    assert client.root.title == "root"
    assert client.commit() == client.tid  # nothing to send


def test_forged_and_altered_keys_are_denied(broker):
    _db, _server, connect = broker
    client = connect()
    real = client.root.item._key
    for forged in (Key("o", real.ident + 1, real.mac), Key("o", real.ident, b"\x00" * 16)):
        proxy = Proxy(client, forged)
        with pytest.raises(exc.AccessDenied):
            proxy.name
    client.root.item.name = "still works"
    client.commit()


def test_new_objects_deletions_and_mapping_items(broker):
    _db, _server, connect = broker
    one, two = connect(), connect()
    root = one.root
    made = one.new("broker_fixtures.Item", name="made")
    root.things["a"] = made
    root.things["b"] = 2
    root.tree["k1"] = made
    root.tree["k2"] = "value"
    root.extra = "temporary"
    assert root.things["a"] is made and len(root.things) == 2 and "b" in root.things
    assert sorted(root.things) == ["a", "b"]
    one.commit()
    assert made._key.kind == "o" and made.name == "made"
    two.begin()
    things = two.root.things
    assert sorted(things.keys()) == ["a", "b"] and things["a"].name == "made"
    assert isinstance(things, MappingProxy)  # became one when first loaded
    assert two.root.tree["k1"] is things["a"] and two.root.tree.get("k2") == "value"
    assert two.root.extra == "temporary"
    del two.root.extra
    del two.root.things["b"]
    del two.root.tree["k2"]
    with pytest.raises(KeyError):
        del two.root.things["missing"]
    two.commit()
    one.begin()
    with pytest.raises(AttributeError):
        one.root.extra
    assert one.root.things.items() == [("a", made)]
    assert one.root.tree.keys() == ["k1"] and one.root.tree.get("k2") is None


def test_new_object_of_a_class_not_creatable_is_refused(broker):
    _db, _server, connect = broker
    with pytest.raises(exc.AccessDenied):
        connect().new("broker_fixtures.Folder")


def test_calls_and_methods(broker):
    _db, _server, connect = broker
    client = connect()
    assert client.call("hello", "you") == "hello you"
    assert client.root.item.shout() == "FIRST!"
    with pytest.raises(exc.AccessDenied):
        client._invoke(client.root.item, "internal", (), {})


def test_search_get_find_count_and_invalidation(broker):
    _db, _server, connect = broker
    one, two = connect(), connect()
    for n in range(5):
        name = "even" if n % 2 == 0 else "odd"
        one.root.things["i%d" % n] = one.new("broker_fixtures.Item", name=name)
    one.commit()
    two.begin()
    things = two.root.things
    assert two.count(things, name="even") == 3
    assert len(two.find(things, name="even", limit=2)) == 2
    with pytest.raises(exc.MultipleResultsError):
        two.get(things, name="odd")
    with pytest.raises(exc.NoResultError):
        two.get(things, name="none")
    assert two.count("broker_fixtures.Item", name="even") == 3
    one.root.things["i1"].name = "unique"
    one.commit()
    assert two.count(things, name="odd") == 2   # cached for the running transaction
    two.begin()
    assert two.count(things, name="odd") == 1
    assert two.get(things, name="unique").name == "unique"
    with pytest.raises(exc.AccessDenied):
        two.count("broker_fixtures.Unknown")


def test_search_fields_named_like_parameters_go_in_a_dict(broker):
    db, _server, connect = broker
    things = db.root.things
    checkout(things)
    for n, (target, limit) in enumerate([("here", 1), ("there", 1), ("here", 2)]):
        item = Item("n%d" % n)
        checkout(item)
        item.target, item.limit = target, limit
        things["t%d" % n] = item
    transaction.commit()
    client = connect()
    remote = client.root.things
    assert client.count(remote, {"target": "here"}) == 2
    assert client.get(remote, {"target": "here", "limit": 2}).name == "n2"
    assert client.get(remote, {"limit": 2}, target="here").name == "n2"
    assert len(client.find(remote, {"limit": 1}, limit=1)) == 1
    assert len(client.find(remote, {"limit": 1})) == 2
    with pytest.raises(TypeError, match="'target' given twice"):
        client.count(remote, {"target": "here"}, target="there")
    with pytest.raises(TypeError, match="a dict or keyword arguments"):
        client.count(remote, ["target"])


def test_what_is_kept_across_transactions_is_bounded(broker, monkeypatch):
    import broker.client as client_module
    monkeypatch.setattr(client_module, "SEARCH_CACHE", 4)
    monkeypatch.setattr(client_module, "ITEM_CACHE", 8)
    _db, server, connect = broker
    client = connect()
    things, tree = client.root.things, client.root.tree
    for n in range(50):
        assert client.count(things, name="n%d" % n) == 0
        assert "missing-%d" % n not in things and tree.get("missing-%d" % n) is None
        client.begin()
    assert len(client._searches) == 4
    assert 0 < len(things._items) <= 8 and 0 < len(tree._items) <= 8
    asked = server.requests["search"]
    assert client.count(things, name="n49") == 0  # the newest are still there
    assert server.requests["search"] == asked
    assert client.count(things, name="n0") == 0  # the oldest went
    assert server.requests["search"] == asked + 1 and len(client._searches) == 4


def test_streams_are_read_in_chunks(broker):
    db, _server, connect = broker
    data = bytes(range(256)) * (3 * STREAM_CHUNK // 256 + 17)
    transaction.begin()
    checkout(db.root.item)
    db.root.item.data = PersistentFile(io.BytesIO(data))
    transaction.commit()
    client = connect()
    stream = client.root.item.data
    assert verifyObject(IRemoteStream, stream)
    assert stream.size == len(data)
    assert stream.read(10) == data[:10] and stream.tell() == 10
    stream.seek(-5, 2)
    assert stream.read() == data[-5:]
    assert stream.seek(0) == 0
    assert stream.read() == data
    assert b"".join(stream) == data
    with pytest.raises(TypeError):
        stream.seek(1.5)
    with pytest.raises(TypeError):
        stream.read(2.5)
    chunks = iter(stream)
    assert next(chunks) == data[:STREAM_CHUNK]
    stream.close()
    with pytest.raises(ValueError):
        stream.read()
    with pytest.raises(ValueError):
        iter(stream)  # a closed stream was still iterable
    with pytest.raises(ValueError):
        next(chunks)


def test_each_read_of_a_stream_attribute_is_a_stream_of_its_own_at_its_snapshot(broker):
    # One stream object was shared by every read of the attribute: its
    # position moved under other readers, and one close() closed it for
    # every later read, for the client's whole life.
    db, _server, connect = broker
    transaction.begin()
    checkout(db.root.item)
    db.root.item.data = PersistentFile(io.BytesIO(b"0123456789"))
    transaction.commit()
    client = connect()
    item = client.root.item
    first = item.data
    assert first.read(4) == b"0123" and item.data.read(4) == b"0123"
    with item.data as stream:
        assert stream.read() == b"0123456789"
    assert item.data.read() == b"0123456789" and first.read() == b"456789"
    held = item.data
    transaction.begin()
    checkout(db.root.item)
    db.root.item.data = PersistentFile(io.BytesIO(b"N" * 30))
    transaction.commit()
    client.begin()
    assert held.read() == b"0123456789"  # its snapshot's bytes, not cut from the new
    assert item.data.read() == b"N" * 30


def test_clients_reading_one_stream_at_once_each_get_their_bytes(broker):
    # The server once read every client's chunk through the stream's one
    # shared position: concurrent readers got each other's bytes, or errors.
    db, _server, connect = broker
    data = bytes((n * 7 + n // 65536) & 0xFF for n in range(4 * STREAM_CHUNK))
    transaction.begin()
    checkout(db.root.item)
    db.root.item.data = PersistentFile(io.BytesIO(data))
    transaction.commit()
    wrong, errors = [], []

    def reader(seed):
        try:
            stream = connect(timeout=5).root.item.data
            for n in range(40):
                offset = (seed * 7919 + n * 104729) * 4096 % (len(data) - 65536)
                stream.seek(offset)
                if stream.read(65536) != data[offset:offset + 65536]:
                    wrong.append(offset)
        except Exception as error:  # reported below, with the thread's others
            errors.append(repr(error))

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (wrong, errors) == ([], [])


def test_client_is_thread_safe(broker):
    _db, _server, connect = broker
    client = connect()
    errors = []

    def read():
        try:
            for _ in range(30):
                assert client.root.item.name == "first"
                assert client.call("hello", "x") == "hello x"
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_gap_in_broadcasts_is_noticed_and_healed(broker):
    _db, server, connect = broker
    one, two = connect(), connect()
    two.root.item.name
    one.root.item.name = "missed"
    one.commit()
    # A broadcast two never saw: the next one does not chain to its last tid.
    seen = two._invalidations
    seen.receive({"srv": server.instance, "seq": seen.seq + 1, "tid": seen.known + 5,
                  "prev": seen.known + 4, "oids": []})
    assert two._invalidations.gap
    two.abort()
    assert two.root.item.name == "first"   # no proof of completeness: snapshot kept
    two.begin()
    assert two.root.item.name == "missed"
    assert not two._invalidations.gap


def test_client_flushes_when_server_history_is_short(tmp_path):
    db = make_database(str(tmp_path / "d.dobbin"))
    with served(db, history=1) as server:
        with BrokerClient(server.address, timeout=TIMEOUT) as one, \
                BrokerClient(server.address, timeout=TIMEOUT) as two:
            unchanged = two.root.things
            len(unchanged)
            assert unchanged._state is not None
            two._conn.broadcasts = lambda timeout=0: []   # two loses every broadcast
            for n in range(3):
                one.root.item.name = "name %d" % n
                one.commit()
            two.begin()
            assert unchanged._state is None   # flushed, though it did not change
            assert two.root.item.name == "name 2"
    db.close()


def test_embedded_writer_in_another_process_is_broadcast(broker):
    db, _server, connect = broker
    client = connect()
    assert client.root.item.name == "first"
    result = run_python(
        "import transaction, broker_fixtures\n"
        "from dobbin.database import Database\n"
        "from dobbin.persistent import checkout\n"
        "db = Database(%r, durability='none')\n"
        "checkout(db.root.item); db.root.item.name = 'from another process'\n"
        "transaction.commit(); print(db.last_tid); db.close()\n" % db.path)
    assert result.returncode == 0, result.stderr
    tid = int(result.stdout)
    assert client.wait_for_broadcast(tid, timeout=5) == tid
    assert client.root.item.name == "first"
    client.begin()
    assert client.root.item.name == "from another process"


def test_begin_sees_other_writers_without_waiting_for_the_poller(tmp_path):
    db = make_database(str(tmp_path / "d.dobbin"))
    with served(db, poll_interval=30) as server:
        with BrokerClient(server.address, timeout=TIMEOUT) as client:
            client.root.item.name
            result = run_python(
                "import transaction, broker_fixtures\n"
                "from dobbin.database import Database\n"
                "from dobbin.persistent import checkout\n"
                "db = Database(%r, durability='none')\n"
                "checkout(db.root.item); db.root.item.name = 'outside'\n"
                "transaction.commit(); db.close()\n" % db.path)
            assert result.returncode == 0, result.stderr
            client.begin()
            assert client.root.item.name == "outside"
    db.close()


def test_server_killed_and_restarted_under_a_live_client(tmp_path):
    path = str(tmp_path / "d.dobbin")
    make_database(path).close()
    address = "ipc://%s/broker.sock" % tmp_path
    process = ServerProcess(path, address).start()
    restarted = None
    try:
        client = BrokerClient(address, timeout=0.5, retries=20)
        item = client.root.item
        assert item.name == "first"
        process.kill()
        # While no server runs, another process changes the item: no broadcast
        # can tell the client, so only its reconnect flush protects it.
        result = run_python(
            "import transaction, broker_fixtures\n"
            "from dobbin.database import Database\n"
            "from dobbin.persistent import checkout\n"
            "db = Database(%r, durability='none')\n"
            "checkout(db.root.item); db.root.item.name = 'changed while down'\n"
            "transaction.commit(); db.close()\n" % path)
        assert result.returncode == 0, result.stderr
        restarted = ServerProcess(path, address)
        starter = threading.Thread(target=restarted.start)
        starter.start()
        client.begin()   # a request that waits out the restart
        starter.join()
        assert item.name == "changed while down"
        item.name = "after restart"
        client.commit()
        client.close()
    finally:
        if restarted is not None and restarted.process is not None:
            assert restarted.stop() == 0   # clean shutdown on SIGTERM
        if process.process.poll() is None:
            process.stop()


def test_a_client_learns_a_restarted_servers_export_rules(tmp_path):
    # It kept the first server's class descriptions for ever, and refused
    # locally what the new server allows.
    db = make_database(str(tmp_path / "d.dobbin"))
    address = "ipc://%s/broker.sock" % tmp_path
    try:
        strict = configure(TestServer(db, address=address))
        strict.export_class(Item, readonly=True)
        with strict:
            client = BrokerClient(address, timeout=TIMEOUT, retries=20)
            item = client.root.item
            with pytest.raises(AttributeError, match="not writable"):
                item.name = "refused"
        with served(db, address=address):  # configure() makes Item writable
            client.begin()
            item.name = "allowed"
            client.commit()
        assert db.root.item.name == "allowed"
        client.close()
    finally:
        db.close()


def test_waiting_for_broadcasts_hears_of_commits_after_a_restart(tmp_path):
    # The new instance's broadcasts were dropped (not the instance the
    # client followed), or lost while it reconnected: deaf for good.
    db = make_database(str(tmp_path / "d.dobbin"))
    address = "ipc://%s/broker.sock" % tmp_path
    try:
        with served(db, address=address):
            client = BrokerClient(address, timeout=TIMEOUT, retries=20)
            assert client.root.item.name == "first"
        with served(db, address=address):
            checkout(db.root.item)
            db.root.item.name = "after the restart"
            transaction.commit()
            tid = db.last_tid
            assert client.wait_for_broadcast(tid, timeout=0.2) == tid
            client.begin()
            assert client.root.item.name == "after the restart"
            assert client.wait_for_broadcast(timeout=0.2) in (None, tid)  # nothing newer
            client.close()
    finally:
        db.close()


@contextlib.contextmanager
def dying_then_restarted(tmp_path):
    """(path, address, dying server): a server that dies inside the first
    write a client makes, and one started on its address once it is dead."""
    path = str(tmp_path / "d.dobbin")
    make_database(path).close()
    address = "ipc://%s/broker.sock" % tmp_path
    dying = ServerProcess(path, address, app="broker_fixtures:configure_dying_after_commit")
    dying.start()
    restarted = ServerProcess(path, address)

    def restart_once_dead():
        dying.process.wait(30)
        restarted.start()

    starter = threading.Thread(target=restart_once_dead)
    starter.start()
    try:
        yield path, address, dying
    finally:
        starter.join()
        for process in (dying, restarted):
            if process.process is not None:
                process.stop()


def test_a_commit_whose_server_died_before_replying_is_answered_once_by_the_next(tmp_path):
    with dying_then_restarted(tmp_path) as (path, address, dying):
        client = BrokerClient(address, timeout=0.5, retries=40)
        root = client.root
        root.item.name = "changed once"
        made = client.new("broker_fixtures.Item", name="made once")
        root.things["made"] = made
        tid = client.commit()  # its server dies; the copy reaches the next one
        assert dying.process.wait(10) == 3  # died inside the commit, unanswered
        # Answered as done: not run again (its old values would no longer match).
        assert made._key.kind == "o" and made.name == "made once"
        assert root.things["made"] is made and root.item.name == "changed once"
        db = Database(path)
        marked = [info.tid for info in db.recent_transactions(10)
                  if COMMIT_MARK in info.extension]
        assert len(marked) == 1 and marked[0] <= tid == db.last_tid
        assert db.root.things["made"].name == "made once"
        db.close()
        root.item.name = "and then"
        client.commit()
        client.close()


def test_an_invoke_whose_server_died_before_replying_is_not_run_again(tmp_path):
    with dying_then_restarted(tmp_path) as (_path, address, dying):
        client = BrokerClient(address, timeout=0.5, retries=40)
        item = client.root.item
        with pytest.raises(exc.ResultLost, match="'rename' ran already"):
            item.rename("renamed once")
        assert dying.process.wait(10) == 3  # died inside the invoke, unanswered
        client.begin()
        assert item.name == "renamed once" and item.renames == 1
        client.close()


def test_a_search_of_a_static_mapping_is_forgotten_when_the_static_changes(broker):
    db, server, connect = broker
    shelf = {"a": db.root.item}
    server.add_static(shelf, "shelf")
    client = connect()
    remote = client.static("shelf")
    assert [item.name for item in client.find(remote, name="first")] == ["first"]
    server.obj_delete(shelf, "a")
    client.wait_for_broadcast(timeout=1)
    client.begin()
    assert len(remote) == 0
    assert client.find(remote, name="first") == [] and client.count(remote) == 0


def test_changing_a_value_read_in_place_changes_nothing_until_it_is_assigned(broker):
    # Values were once handed out from the cache itself: a list changed in
    # place changed the cache and the old value sent, so the commit of a
    # read-modify-write always conflicted, and the change outlived begin().
    _db, _server, connect = broker
    client, other = connect(), connect()
    item, things = client.root.item, client.root.things
    item.name = ["a"]
    things["k"] = {"tags": ["x"]}
    client.commit()
    tags = item.name
    tags.append("b")
    assert item.name == ["a"]
    item.name = tags
    entry = things["k"]
    entry["tags"].append("y")
    assert things["k"] == {"tags": ["x"]} and dict(things.items())["k"] == {"tags": ["x"]}
    things["k"] = entry
    # Once assigned, a value is this transaction's own, an item's as an
    # attribute's: a change to it goes in (an item's was dropped silently).
    item.name.append("c")
    things["k"]["tags"].append("z")
    assert item.name is tags and things["k"] is entry
    client.commit()
    other.begin()
    assert other.root.item.name == ["a", "b", "c"]
    assert other.root.things["k"] == {"tags": ["x", "y", "z"]}
    item.name.append("local only")
    dict(things.items())["k"]["tags"].append("local only")
    client.begin()
    assert item.name == ["a", "b", "c"] and things["k"] == {"tags": ["x", "y", "z"]}


def test_a_value_holding_nan_can_be_changed(broker):
    _db, _server, connect = broker
    client = connect()
    item = client.root.item
    item.name = [float("nan")]
    client.commit()
    item.name = "after nan"
    client.commit()
    client.root.things["n"] = float("nan")
    client.commit()
    del client.root.things["n"]
    client.commit()
    assert item.name == "after nan" and "n" not in client.root.things


def test_a_refused_new_object_leaves_the_transaction_as_it_was(broker):
    _db, _server, connect = broker
    client = connect()
    client.root.item.name = "kept"
    with pytest.raises(AttributeError, match="not writable"):
        client.new("broker_fixtures.Item", shout="a method")
    client.commit()  # once failed: the refused object was in the commit, unlinked
    assert client.root.item.name == "kept"


def test_a_new_object_linked_from_nothing_fails_the_commit_clearly(broker):
    _db, _server, connect = broker
    client = connect()
    client.root.item.name = "not kept"
    client.new("broker_fixtures.Item", name="orphan")
    with pytest.raises(exc.ProtocolError, match=r"new object #1 \(broker_fixtures.Item\) "
                                                 "is not reachable"):
        client.commit()
    client.begin()
    assert client.root.item.name == "first"


def test_a_new_object_of_a_transaction_that_ended_unstored_is_refused(broker):
    # Its changes went nowhere: a commit skips what it no longer creates.
    _db, _server, connect = broker
    client, other = connect(), connect()
    aborted = client.new("broker_fixtures.Item", name="aborted")
    client.abort()
    client.root.item.name = "conflicting"
    failed = client.new("broker_fixtures.Item", name="failed")
    client.root.things["failed"] = failed
    other.root.item.name = "first to commit"
    other.commit()
    with pytest.raises(exc.ConflictError):
        client.commit()
    for stale in (aborted, failed):
        with pytest.raises(exc.StaleProxyError, match="ended without storing it"):
            stale.name = "lost"
        client.root.things["stale"] = stale
        with pytest.raises(exc.StaleProxyError):
            client.commit()
        client.abort()
    with pytest.raises(exc.EncodeError):
        client.find(other.root.things)  # another client's proxy
    client.begin()
    assert sorted(client.root.things) == []


def test_waiting_for_a_broadcast_already_known_returns_at_once(broker):
    _db, _server, connect = broker
    client, other = connect(), connect()
    client.root.item.name = "waited for"
    tid = client.commit()
    assert client.wait_for_broadcast(tid, timeout=30) == tid  # its own: once waited 30 s
    assert other.wait_for_broadcast(tid, timeout=30) == tid
    other.begin()
    assert other.wait_for_broadcast(tid, timeout=30) == tid


def test_a_dropped_mapping_proxy_is_not_kept_alive_by_its_dependencies(broker):
    _db, _server, connect = broker
    client = connect()
    proxy = Proxy(client, Key("o", 12345))
    client._watch_deps(proxy, [7, 8])
    assert list(client._watch[7]) == [proxy]
    del proxy
    gc.collect()
    assert list(client._watch[7]) == [] and list(client._watch[8]) == []


def test_the_dependencies_of_dropped_mapping_proxies_are_forgotten(broker):
    # Each left an empty entry until its oid changed: a client that read one
    # item of each of 4,000 mappings kept 4,000 entries, 2.5 MB.
    _db, _server, connect = broker
    client = connect()
    for oid in range(4000):
        client._watch_deps(Proxy(client, Key("o", 100000 + oid)), [oid])
    assert len(client._watch) < 1000


def test_a_tree_item_is_read_through_its_path_not_the_whole_tree(broker):
    # Every item lookup walked all the tree's values and buckets (0.1 s at
    # 200k items, in the server's front thread), and any change anywhere
    # in the tree made it a read conflict.  A change after the snapshot in
    # the item's own bucket is read past, from the log's older version.
    db, _server, connect = broker
    transaction.begin()
    tree = db.root.tree
    tree.update(("k%05d" % n, n) for n in range(3000))
    transaction.commit()
    client = connect()
    remote = client.root.tree
    assert remote["k00001"] == 1
    watched = [oid for oid, proxies in client._watch.items() if remote in proxies]
    assert 2 <= len(watched) <= 5  # the tree, its nodes down to one bucket
    transaction.begin()
    tree["k02999"] = "changed far away"
    transaction.commit()
    assert remote["k00002"] == 2  # same snapshot, another bucket changed: no conflict
    transaction.begin()
    tree["k00003"] = "changed in its bucket"
    transaction.commit()
    assert remote["k00004"] == 4 and remote["k00003"] == 3  # as of the snapshot
    client.begin()
    assert remote["k00003"] == "changed in its bucket" and remote["k02999"] == "changed far away"


def test_begin_takes_broadcast_states_without_loading(broker):
    _db, server, connect = broker
    one, two = connect(), connect()
    item = two.root.item
    assert item.name == "first"
    one.root.item.name = "pushed"
    tid = one.commit()
    assert two.wait_for_broadcast(tid, timeout=2) == tid
    assert item.name == "first"            # snapshot isolation: not before begin()
    loads = server.requests["load"]
    two.begin()
    assert item.name == "pushed"
    assert server.requests["load"] == loads   # the state came with the broadcast
    with pytest.raises(AttributeError):
        item.secret                           # and the hidden field did not
    assert "secret" not in item._state


def test_commit_reply_carries_the_written_states(broker):
    _db, server, connect = broker
    client = connect()
    item = client.root.item
    item.name = "written"
    made = client.new("broker_fixtures.Item", name="created")
    client.root.things["made"] = made
    client.commit()
    loads = server.requests["load"]
    assert item.name == "written" and made.name == "created"
    item.name = "again"                       # the old value is known: no load either
    client.commit()
    assert item.name == "again"
    assert server.requests["load"] == loads


def test_a_missed_broadcast_means_loading_again(broker):
    _db, server, connect = broker
    one, two = connect(), connect()
    item = two.root.item
    item.name
    one.root.item.name = "first change"
    tid = one.commit()
    assert wait_until(lambda: any(                # two misses this broadcast...
        message["tid"] == tid for message in two._conn.broadcasts(timeout=0.1)))
    one.root.item.name = "second change"
    tid = one.commit()
    assert two.wait_for_broadcast(tid, timeout=2) == tid
    assert two._invalidations.gap
    loads = server.requests["load"]
    two.begin()                               # ...so it cannot trust the newer one
    assert item.name == "second change"
    assert server.requests["load"] == loads + 1


def test_a_state_pushed_before_a_newer_change_is_not_used(broker):
    _db, server, connect = broker
    one, two = connect(), connect()
    item = two.root.item
    item.name
    one.root.item.name = "old"
    tid = one.commit()
    assert two.wait_for_broadcast(tid, timeout=2) == tid
    # A later transaction changes the item but its broadcast carries no state
    # (as for a big transaction): the pushed "old" is not the newest any more.
    one.root.item.name = "new"
    tid = one.commit()
    assert two.wait_for_broadcast(tid, timeout=2) == tid
    newest = two._invalidations.pending[-1]
    two._invalidations.pending[-1] = (newest[0], newest[1], {})
    two.begin()
    assert item.name == "new"


def test_close_from_another_thread_ends_a_request_in_flight(broker):
    # close() waited for the request in flight, and so for the method
    # (here, for ever) and every retry of it.
    _db, server, connect = broker
    release = threading.Event()
    server.do_hold = lambda: release.wait(60)
    client = connect(timeout=30)
    failures = []

    def hold():
        try:
            client.call("hold")
        except exc.ClientClosed as error:
            failures.append(error)

    caller = threading.Thread(target=hold)
    caller.start()
    assert wait_until(lambda: server.requests["call"])
    closer = threading.Thread(target=client.close)
    closer.start()
    closer.join(20)
    try:
        assert not closer.is_alive()
        caller.join(20)
        assert "unknown" in str(failures[0])
        with pytest.raises(exc.ClientClosed):
            client.call("hello", "again")
    finally:
        release.set()
        closer.join()
        caller.join()


def test_every_use_of_a_closed_client_raises_client_closed(broker):
    # Cached reads, local writes, new(), abort() and an empty commit() went
    # on working after close().
    _db, _server, connect = broker
    client = connect()
    item = client.root.item
    assert item.name == "first"
    assert client.find("broker_fixtures.Item", name="first") == [item]
    client.close()
    uses = [lambda: item.name, lambda: setattr(item, "name", "x"), lambda: client.root,
            lambda: client.find("broker_fixtures.Item", name="first"),
            lambda: client.new("broker_fixtures.Item", name="n"),
            client.abort, client.commit, client.begin, lambda: item.shout()]
    for use in uses:
        with pytest.raises(exc.ClientClosed):
            use()
    client.close()  # still idempotent
