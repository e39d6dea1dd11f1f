"""broker.invalidations: a client's snapshot, and what it applies at a boundary.

No server: the broadcast feed is scripted, states are JSON records sealed as
the server seals them.  tests/test_client.py covers the same against a
real server.
"""

import json
import weakref

from broker import protocol
from broker.invalidations import MAX_PENDING, Invalidations
from broker.keys import Key
from broker.proxy import Proxy
from broker.states import seal

SERVER = 7
MAC = bytes(range(16))


class Feed:
    """The broadcast side of a Connection: hands out what is waiting."""

    def __init__(self):
        self.waiting = []

    def broadcasts(self, timeout=0):
        taken, self.waiting = self.waiting, []
        return taken


def record(data, serial):
    try:
        decoded = json.loads(data)
    except ValueError:
        return None  # noise: sealed with another key
    return decoded if serial is None or decoded["serial"] == serial else None


def take(proxy, decoded):
    object.__setattr__(proxy, "_state", decoded["state"])


def data(serial, **state):
    return json.dumps({"class": "C", "serial": serial, "state": state}).encode()


class Client:
    """The caches an Invalidations empties, with it at snapshot 10 (broadcast 0)."""

    def __init__(self):
        self.feed = Feed()
        self.cache = weakref.WeakValueDictionary()
        self.searches, self.watch = {}, {}
        self.view = Invalidations(self.feed, self.cache, self.searches, self.watch,
                                  record, take)
        self.view.follow(SERVER, 0)
        self.view.synced(10, [], 0)

    def loaded(self, kind, ident, **state):
        proxy = self.cache[(kind, ident)] = Proxy(None, Key(kind, ident, MAC))
        object.__setattr__(proxy, "_state", state)
        return proxy


def changed(seq, tid, oids, states=()):
    return protocol.invalidation(SERVER, seq, tid, tid - 1, oids, states)


def test_what_broadcasts_say_changed_is_applied_at_the_next_boundary_only():
    client = Client()
    one, two = client.loaded("o", 1, name="one"), client.loaded("o", 2, name="two")
    client.feed.waiting = [changed(1, 11, [1])]
    client.view.drain()
    assert client.view.known == 11 and client.view.tid == 10
    assert one._state == {"name": "one"}  # never under a running transaction
    client.view.aborted()
    assert client.view.tid == 11 and client.view.pending == []
    assert one._state is None and two._state == {"name": "two"}


def test_searches_and_mapping_items_go_with_the_oids_they_depend_on():
    client = Client()
    mapping = client.loaded("o", 3)
    client.watch[1] = weakref.WeakSet([mapping])
    client.searches.update({"on 1": ([], [1]), "on 2": ([], [2]), "static": ([], None)})
    client.view.receive(changed(1, 11, [1]))
    client.view.aborted()
    assert sorted(client.searches) == ["on 2"] and 1 not in client.watch
    assert mapping._state is None


def test_a_missed_broadcast_is_a_gap_that_only_a_sync_closes():
    client = Client()
    one, static = client.loaded("o", 1, name="one"), client.loaded("s", ("settings",))
    client.view.receive(changed(2, 12, [2]))  # broadcast 1 (tid 11) never came
    assert client.view.gap and not client.view.flush_needed
    client.view.aborted()
    assert client.view.tid == 10 and one._state is not None  # no proof of completeness
    client.view.synced(12, [1, 2], 2)
    assert client.view.tid == client.view.known == 12 and not client.view.gap
    assert one._state is None and static._state is None  # its statics are unknown: all go


def test_after_a_gap_broadcasts_are_not_kept_one_by_one():
    # A client that only aborts never closes a gap: it kept every later
    # broadcast, oids and states, and its memory grew with every commit.
    client = Client()
    one = client.loaded("o", 1, name="one")
    client.view.receive(changed(1, 11, [1]))
    client.view.receive(changed(3, 13, [1]))  # broadcast 2 (tid 12) never came
    for n in range(4, 1000):
        sealed = seal(MAC, SERVER, n + 10, data(n + 10, name="new"))
        client.view.receive(changed(n, n + 10, [1, 2, 3], [[1, sealed]]))
        client.view.aborted()
    assert [tid for tid, _, _ in client.view.pending] == [11, 1009]
    assert client.view.pending[-1][1:] == (frozenset(), {})
    assert client.view.poll(1009) == (True, 1009)
    client.view.synced(1009, [1, 2, 3], 999)  # what the sync says changed since 11
    assert one._state is None and client.view.pending == [] and not client.view.gap


def test_a_client_that_never_reaches_a_boundary_keeps_a_bounded_number_of_broadcasts():
    # One that only waits for broadcasts kept every one, states and all.
    client = Client()
    one = client.loaded("o", 1, name="one")
    for n in range(1, 3 * MAX_PENDING):
        sealed = seal(MAC, SERVER, n + 10, data(n + 10, name="new"))
        client.view.receive(changed(n, n + 10, [n % 2 + 1], [[1, sealed]]))
        assert len(client.view.pending) <= MAX_PENDING
    newest = 3 * MAX_PENDING + 9
    assert client.view.poll(newest) == (True, newest)
    assert one._state == {"name": "one"}  # still the snapshot's
    # The boundary's sync says what changed since the snapshot (tid 10).
    assert client.view.gap and client.view.known == 10
    client.view.synced(newest, [1, 2], 3 * MAX_PENDING - 1)
    assert one._state is None and client.view.pending == [] and not client.view.gap


def test_a_broadcast_state_is_taken_only_when_it_is_the_newest_at_the_snapshot():
    client = Client()
    item = client.loaded("o", 1, name="first")
    client.view.receive(changed(1, 11, [1], [[1, seal(MAC, SERVER, 11, data(11, name="pushed"))]]))
    client.view.aborted()
    assert item._state == {"name": "pushed"}
    # A later change that brought no state (a big transaction) makes it stale.
    client.view.receive(changed(2, 12, [1], [[1, seal(MAC, SERVER, 12, data(12, name="old"))]]))
    client.view.receive(changed(3, 13, [1]))
    client.view.aborted()
    assert item._state is None
    other = client.loaded("o", 2, name="x")  # sealed with another key: noise, refused
    client.view.receive(changed(4, 14, [2], [[2, seal(b"k" * 16, SERVER, 14, data(14))]]))
    client.view.aborted()
    assert other._state is None


def test_broadcasts_kept_past_a_boundary_still_count_as_received():
    # Advancing to tid 11 with broadcast 12 kept for later set `known` back
    # to 11: broadcast 13 (prev 12) then looked like a gap, and a sync
    # was needed, and the states it pushed were lost.
    client = Client()
    item = client.loaded("o", 3, name="before")
    client.view.receive(changed(1, 11, [1]))
    client.view.receive(changed(2, 12, [2]))
    client.view.committed(11, [1], [])  # our commit, whose reply came after 12's broadcast
    assert client.view.tid == 11 and client.view.known == 12
    sealed = seal(MAC, SERVER, 13, data(13, name="pushed"))
    client.view.receive(changed(3, 13, [3], [[3, sealed]]))
    assert not client.view.gap
    client.view.aborted()
    assert client.view.tid == 13 and item._state == {"name": "pushed"}


def test_a_commit_takes_the_states_its_reply_carries():
    client = Client()
    item = client.loaded("o", 1, name="before")
    client.view.committed(11, [1], [(("o", 1), data(11, name="written"))])
    assert client.view.tid == 11 and item._state == {"name": "written"}


def test_unknown_changes_or_another_server_instance_flush_everything():
    client = Client()
    item = client.loaded("o", 1, name="one")
    client.searches["s"] = ([], [5])
    client.view.synced(11, None, 0)  # the server's history does not reach back
    assert item._state is None and client.searches == {}
    item = client.loaded("o", 1, name="one")
    client.view.restarted()
    client.view.follow(SERVER + 1, 0)
    assert client.view.gap and client.view.flush_needed
    client.view.receive(changed(1, 12, [2]))  # the old instance's: ignored
    assert client.view.pending == []
    client.view.synced(12, [], 0)
    assert item._state is None and not client.view.flush_needed


def test_broadcasts_a_sync_found_missing_are_no_gap_when_they_come_late():
    client = Client()
    static = client.loaded("s", ("settings",))
    client.view.synced(11, [], 2)  # broadcasts 1 and 2 are not here yet
    assert static._state is None   # what they say of statics is unknown
    static = client.loaded("s", ("settings",))
    client.view.receive(protocol.static_invalidation(SERVER, 1, [["settings"]]))
    client.view.receive(changed(2, 11, [1]))
    assert not client.view.gap and not client.view.flush_needed
    client.view.aborted()
    assert static._state == {}


def test_poll_reports_what_was_broadcast():
    client = Client()
    assert client.view.poll(10) == (True, 10)  # known already: at once
    assert client.view.poll() == (False, None)
    client.feed.waiting = [changed(1, 11, [1])]
    assert client.view.poll(12) == (False, 11)
    assert client.view.poll() == (True, 11) and client.view.poll(11) == (True, 11)
