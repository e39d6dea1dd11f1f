"""Tests of dobbin.cache: identity, the byte bound, and what eviction spares."""

import gc

import pytest

from dobbin.cache import ObjectCache, state_cost
from dobbin.database import Database
from dobbin.persistent import Persistent, _set_local, new_ghost


class Thing(Persistent):
    pass


def ghost(oid):
    return new_ghost(Thing, oid, None)


def loaded(cache, oid, size=10):
    obj = ghost(oid)
    cache.remember(obj)
    cache.install(obj, {"n": oid}, 1, size)
    return obj


def test_a_loaded_object_is_held_and_counted():
    cache = ObjectCache(None)
    obj = loaded(cache, 1, size=10)
    del obj
    gc.collect()
    assert cache.get(1).n == 1
    assert cache.loaded_bytes == state_cost(10)


def test_a_ghost_is_the_object_of_its_oid_only_while_reachable():
    cache = ObjectCache(None)
    obj = ghost(7)
    cache.remember(obj)
    assert cache.get(7) is obj
    del obj
    gc.collect()
    assert cache.get(7) is None


def test_reinstalling_a_state_replaces_its_cost():
    cache = ObjectCache(None)
    obj = loaded(cache, 1, size=10)
    cache.install(obj, {"n": 2}, 2, 30)
    assert (obj.n, obj._p_serial, cache.loaded_bytes) == (2, 2, state_cost(30))


def test_an_unloaded_object_is_a_ghost_of_its_new_serial_and_keeps_its_identity():
    cache = ObjectCache(None)
    obj = loaded(cache, 1, size=10)
    cache.unload(obj, 5)
    assert (obj._p_ghost, obj._p_serial, cache.loaded_bytes) == (True, 5, 0)
    assert cache.get(1) is obj
    del obj
    gc.collect()
    assert cache.get(1) is None  # held weakly now, like any ghost


def test_the_oldest_states_are_evicted_past_the_bound():
    cache = ObjectCache(3 * state_cost(10))
    objects = [loaded(cache, oid) for oid in range(1, 6)]
    assert cache.loaded_bytes <= cache.cache_size
    # Evicted in a batch, oldest first, down to 15/16 of the bound.
    assert [obj._p_ghost for obj in objects] == [True, True, False, False, False]
    assert list(cache.loaded) == [3, 4, 5]
    # Evicted objects keep their identity while held.
    assert cache.get(1) is objects[0]


def test_an_evicted_object_nobody_holds_is_forgotten():
    cache = ObjectCache(state_cost(10))
    loaded(cache, 1)
    loaded(cache, 2)
    gc.collect()
    assert cache.get(1) is None and cache.get(2) is not None


def test_evicted_objects_that_die_are_forgotten_though_nothing_is_loaded():
    # A process that commits new objects (installed, not loaded) and drops
    # them: each eviction left a dead weak reference behind, for ever.
    cache = ObjectCache(4 * state_cost(10))
    for oid in range(1, 20_001):
        cache.install(ghost(oid), {"n": oid}, 1, 10)
    assert len(cache._weak) < 3000


def test_the_newest_state_stays_even_if_it_outgrows_the_bound():
    cache = ObjectCache(100)
    obj = loaded(cache, 1, size=1000)
    assert not obj._p_ghost and list(cache.loaded) == [1]


def test_checked_out_states_are_spared_and_become_the_newest():
    cache = ObjectCache(2 * state_cost(10))
    first = loaded(cache, 1)
    _set_local(first, {"a thread": {"n": 1}})
    for oid in range(2, 5):
        loaded(cache, oid)
    assert not first._p_ghost
    assert 1 in cache.loaded and list(cache.loaded)[0] != 1


def test_a_cache_full_of_checked_out_states_is_not_rescanned_on_every_install():
    cost = state_cost(10)
    cache = ObjectCache(16 * cost)
    pinned = []
    for oid in range(1, 18):  # the 17th install finds nothing to evict
        obj = loaded(cache, oid)
        _set_local(obj, {"a thread": {}})
        pinned.append(obj)
    order = list(cache.loaded)
    loaded(cache, 18)  # an eighth of the bound has not been added since
    assert list(cache.loaded) == order + [18], "no second pass over the pinned states"
    for obj in pinned:
        _set_local(obj, None)
    loaded(cache, 19)
    loaded(cache, 20)  # past the eighth: evicts what is no longer checked out
    assert cache.loaded_bytes <= cache.cache_size


def test_checked_out_states_far_past_a_tiny_bound_are_rescanned_rarely(monkeypatch):
    # With a bound of a byte, "another eighth of the bound" was nothing:
    # every install scanned every pinned state again (quadratic).
    cache = ObjectCache(1)
    passes = []
    real_evict = ObjectCache._evict
    monkeypatch.setattr(ObjectCache, "_evict", lambda self: passes.append(real_evict(self)))
    pinned = []
    for oid in range(1, 2001):
        obj = loaded(cache, oid)
        _set_local(obj, {"a thread": {}})
        pinned.append(obj)
    assert len(cache.loaded) == 2000
    assert len(passes) < 100  # geometric: about log(2000) / log(9/8) passes
    for obj in pinned:
        _set_local(obj, None)
    loaded(cache, 3000, size=cache.loaded_bytes)  # past the next eighth
    assert list(cache.loaded) == [3000]


def test_a_state_is_billed_for_the_ghosts_its_load_made(tmp_path):
    import transaction

    from dobbin.cache import GHOST_COST
    from dobbin.database import Database
    from dobbin.persistent import PersistentDict, checkout

    assert state_cost(10, 3) == state_cost(10) + 3 * GHOST_COST
    path = str(tmp_path / "ghosts.dobbin")
    with Database(path) as db:
        root = PersistentDict()
        checkout(root)
        db.elect(root)
        for n in range(40):
            root[n] = Thing()
        transaction.commit()
    with Database(path) as db:
        root = db.root
        cache = db._cache
        assert cache.ghosts_made == 1 + 40  # the root, then its children
        data = db._log.read_object(db._index.offset_of(root._p_oid), root._p_oid)[2]
        assert cache.loaded_bytes == state_cost(len(data), 40)
        transaction.abort()


def test_states_share_their_serial_and_cost_int_objects():
    cache = ObjectCache(None)
    big = 10 ** 6  # beyond the ints Python itself shares
    first, second = ghost(1), ghost(2)
    for obj in (first, second):
        cache.remember(obj)
        cache.install(obj, {"n": 1}, int(str(big)), 10 ** 5 + 3)  # a fresh int each time
    assert first._p_serial == second._p_serial == big
    assert first._p_serial is second._p_serial
    assert first._p_size is second._p_size


def test_a_wrong_cache_size_is_refused_before_the_file_is_opened(tmp_path):
    path = tmp_path / "c.dobbin"
    for size, error in (("128M", TypeError), (1.5e8, TypeError), (True, TypeError),
                        (0, ValueError), (-1, ValueError)):
        with pytest.raises(error):
            ObjectCache(size)
        with pytest.raises(error):
            Database(str(path), durability="none", cache_size=size)
        assert not path.exists()
    assert ObjectCache(None).cache_size is None and ObjectCache(1).cache_size == 1


class ReadsOnFree:
    """A value whose finalizer reads a persistent object, as cleanup code
    may: evicting the state that holds it loads another state."""

    database = None

    def __init__(self, index):
        self.index = index

    def __del__(self):
        if self.database is None or self.database.closed:
            return
        items = self.database.root["items"]
        items[(self.index * 7 + 3) % len(items)].index


class Holder(Persistent):
    def __init__(self, index):
        self.index = index
        self.token = ReadsOnFree(index)
        self.padding = "x" * 100


def fill(path, count=200):
    import transaction
    from dobbin.persistent import PersistentDict
    db = Database(path, durability="none")
    db.elect(PersistentDict(items=[Holder(i) for i in range(count)], counter=0))
    transaction.commit()
    db.close()


@pytest.mark.parametrize("cache_size", [3000, 30000])
def test_finalizers_that_load_during_eviction_break_neither_reads_nor_commits(
        tmp_path, cache_size):
    # The load inside the eviction evicted again: the outer one then
    # failed with KeyError, in a read or in a commit (written, reported failed).
    import transaction
    from dobbin.persistent import PersistentDict, checkout
    path = str(tmp_path / "db.dobbin")
    fill(path)
    db = ReadsOnFree.database = Database(path, durability="none", cache_size=cache_size)
    try:
        for _ in range(3):
            assert sum(item.index for item in db.root["items"]) == sum(range(200))
        checkout(db.root)
        db.root["counter"] += 1
        db.root["new"] = new = PersistentDict(blob="b" * 20000)  # its install evicts
        transaction.commit()
        assert new._p_oid is not None
        cache = db._cache
        assert cache.loaded_bytes == sum(obj._p_size for obj in cache.loaded.values())
        checkout(db.root)
        db.root["counter"] += 1
        transaction.commit()
    finally:
        db.close()
        ReadsOnFree.database = None
    reopened = Database(path, read_only=True)
    assert reopened.root["counter"] == 2 and "new" in reopened.root
    reopened.close()
