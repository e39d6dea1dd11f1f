"""A database's objects in memory: one per oid, loaded states bounded in bytes.

Loaded objects (those with a state) are held strongly, oldest load first,
and their estimated sizes are added up.  Past `cache_size` bytes the
oldest states are dropped (their objects become ghosts again), except
those some thread has checked out.  Every other object (ghosts, evicted
ones) is held only weakly: it stays the object of its oid while user
code can reach it, and no longer.

The caller (the database) holds its state lock around every method but
`get`, which may run without it: a miss there must be checked again
under the lock before a new object is made.
"""

import weakref

from dobbin.exc import InvalidTypeError, InvalidValueError
from dobbin.persistent import Persistent, install_state

# The slots read directly: eviction touches every cached object and must
# not pay for Persistent.__getattribute__.
_size_of = Persistent._p_size.__get__
_state_of = Persistent.__dict__["__dict__"].__get__  # never a thread's working copy
_oid_of = Persistent._p_oid.__get__
_checkouts_of = Persistent._p_local.__get__
_set_ghost = Persistent._p_ghost.__set__
_set_serial = Persistent._p_serial.__set__


# What one ghost costs: its object, its empty dict, a weak reference and
# the map entry (measured on CPython 3.11, rounded up).
GHOST_COST = 300


def state_cost(pickled_size, ghosts=0):
    """Estimated bytes in memory of a state pickled in `pickled_size` bytes
    whose loading made `ghosts` new ghosts (its references not yet loaded).

    A ghost lives as long as the states referring to it, so it is billed
    to the state whose load made it: a B-tree bucket's 64 references
    cost far more than its pickle.  Calibrated by loading 100k small
    objects and their B-tree buckets: the estimate came to 1.2 x the RSS
    they took (an object loaded after its ghost is billed twice).
    """
    return 4 * pickled_size + 256 + GHOST_COST * ghosts


_shared_numbers = {}


def _shared(number):
    """One int object per value: the states of a big commit share its tid,
    and most states' costs repeat.  Each int is 28 bytes otherwise."""
    found = _shared_numbers.get(number)
    if found is None:
        if len(_shared_numbers) >= 65536:
            _shared_numbers.clear()  # bounded; sharing is only a saving
        found = _shared_numbers[number] = number
    return found


class ObjectCache:
    """The identity map and the bounded set of loaded states of one database."""

    def __init__(self, cache_size):
        # Checked now: a wrong bound would otherwise fail a later commit
        # after its record was written.
        if cache_size is not None:
            if not isinstance(cache_size, int) or isinstance(cache_size, bool):
                raise InvalidTypeError("cache_size is a number of bytes (an int) or None, not %r"
                                       % (cache_size,))
            if cache_size <= 0:
                raise InvalidValueError("cache_size must be positive (or None for no bound), "
                                        "not %d" % cache_size)
        self.cache_size = cache_size   # bytes, or None for no bound
        self.loaded = {}               # oid -> object with a state, oldest load first
        self.loaded_bytes = 0
        # Weak references cost 130 bytes each: only objects not in
        # `loaded` get one.
        self._weak = {}                # oid -> weakref
        self._weak_pruned_at = 1024
        self._evict_retry_at = 0
        self._evicting = False
        self.ghosts_made = 0           # ever: a loader bills the ones its load made

    def get(self, oid):
        """The object of `oid` if one is in memory, else None."""
        obj = self.loaded.get(oid)
        if obj is not None:
            return obj
        ref = self._weak.get(oid)
        return None if ref is None else ref()

    def remember(self, obj):
        """Make ghost `obj` the object of its oid while it is reachable."""
        self._weak[_oid_of(obj)] = weakref.ref(obj)
        self.ghosts_made += 1
        self._prune()

    def _prune(self):
        """Forget dead weak references once the map doubled since the last
        time: now and then costs less than a callback on every death."""
        weak = self._weak
        if len(weak) > 2 * self._weak_pruned_at:
            for oid in [oid for oid, ref in weak.items() if ref() is None]:
                del weak[oid]
            self._weak_pruned_at = max(1024, len(weak))

    def install(self, obj, state, serial, pickled_size, ghosts=0):
        """Make `state` the shared state of `obj`, evicting older states if
        needed; loading it made `ghosts` new ghosts (see `state_cost`)."""
        oid = _oid_of(obj)
        loaded = self.loaded
        if loaded.pop(oid, None) is not None:
            self.loaded_bytes -= _size_of(obj)
        cost = _shared(state_cost(pickled_size, ghosts))
        install_state(obj, state, _shared(serial), cost)
        loaded[oid] = obj
        self._weak.pop(oid, None)  # after the line above, so `get` always finds it
        self.loaded_bytes += cost
        if (self.cache_size is not None and self.loaded_bytes > self.cache_size
                and self.loaded_bytes > self._evict_retry_at and not self._evicting):
            self._evict()

    def unload(self, obj, serial):
        """Make `obj` a ghost of its record as of `serial`: for a state that
        could not be loaded.  Its checkouts keep their copies, and the new
        serial makes their commits conflict."""
        _set_serial(obj, _shared(serial))
        oid = _oid_of(obj)
        if oid in self.loaded:
            self._drop_state(oid, obj)

    def _drop_state(self, oid, obj):
        """Make loaded `obj` a ghost, still the object of `oid` while
        reachable; return the state it had (see _evict)."""
        self._weak[oid] = weakref.ref(obj)  # before it leaves `loaded`: see get
        del self.loaded[oid]
        self.loaded_bytes -= _size_of(obj)
        state = _state_of(obj)
        # Ghost flag first, then the empty dict: see Persistent.__getattribute__.
        _set_ghost(obj, True)
        object.__setattr__(obj, "__dict__", {})
        return state

    def _evict(self):
        loaded = self.loaded
        cache_size = self.cache_size
        # Down to 15/16 of the bound, so that evictions come in batches: a
        # dict gives up its oldest entries cheaply only in bulk.
        excess = self.loaded_bytes - (cache_size - cache_size // 16)
        victims = []
        # The newest state stays even if it alone outgrows the cache: its
        # reader is about to use it.
        candidates = len(loaded) - 1
        for oid, obj in loaded.items():
            if excess <= 0 or len(victims) == candidates:
                break
            victims.append((oid, obj))
            excess -= _size_of(obj)
        spared = 0
        # Freeing a state may run finalizers (__del__, weakref callbacks) that
        # load objects: until the states are freed, at the end, a load evicts
        # nothing (nor a cascade of such finalizers).
        dropped = []
        self._evicting = True
        try:
            for oid, obj in victims:
                if loaded.get(oid) is not obj:
                    continue  # unloaded meanwhile
                if _checkouts_of(obj):
                    del loaded[oid]
                    loaded[oid] = obj  # checked out, so in use: now the newest
                    spared += _size_of(obj)
                    continue
                dropped.append(self._drop_state(oid, obj))
            self._prune()  # evicted objects nobody holds die, often unloaded again
            # States that stayed because they are checked out would be scanned
            # again on every load (quadratic in a big commit): try again only
            # once the cache has grown by another eighth of the bound, or of
            # the states spared, if more (so the scans add up to a few per load).
            self._evict_retry_at = (
                self.loaded_bytes + max(cache_size, spared) // 8
                if self.loaded_bytes > cache_size else 0)
            del victims, dropped
        finally:
            self._evicting = False
