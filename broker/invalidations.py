"""What a broker client learns of the server's changes, and its snapshot.

A client transaction reads one snapshot of the database, named by its tid.
Object states are loaded at that tid and cached across transactions; at
every boundary (begin, commit, abort) the client applies the invalidations
it has learned since, and only then moves to the new snapshot, so objects
never change under a running transaction.

It learns invalidations two ways: from the server's broadcasts (drained
at boundaries) and from the "changed" list of sync and commit replies,
which covers everything since the last tid it knew.  When it cannot prove
it knows every change (the server's history does not reach back, or the
server restarted), it flushes its whole cache instead.

It also learns new states without loading them: a commit reply carries the
states of the objects the commit wrote, and broadcasts carry the sealed
states of small transactions' objects, which the client unseals with the
keys it holds.  A broadcast state replaces a cached one only at a boundary,
and only if the client has every broadcast up to the new snapshot (so it is
sure that state is the newest as of the snapshot).
"""

from broker.states import unseal

# Seconds one poll for broadcasts waits (a waiting client lets its lock go
# between polls).
POLL = 0.02

# Broadcasts kept for the next boundary; past this many, they are dropped
# as after a gap (the sync at that boundary names what changed).
MAX_PENDING = 1000


class Invalidations:
    """One client's snapshot tid, the changes it has learned since, and
    applying them to its caches at a transaction boundary.

    `conn` is the client's Connection (its broadcast feed).  `cache` maps
    key tokens to proxies (weakly), `searches` search entries to (result,
    deps), `watch` oids to the mapping proxies whose items depend on them:
    the client's caches, which this object empties of what changed.
    `record(data, serial)` returns the usable state record encoded in `data`
    (of transaction `serial`, if not None), or None; `take(proxy, record)`
    makes it the proxy's state.  Not thread-safe: the client calls it under
    its lock.
    """

    def __init__(self, conn, cache, searches, watch, record, take):
        self._conn = conn
        self._cache = cache
        self._searches = searches
        self._watch = watch
        self._record = record
        self._take = take
        self.server = None     # the server instance whose broadcasts count
        self.seq = None        # the number of its last broadcast taken
        self.pending = []      # (tid, oids, {oid: record}) broadcast, not yet applied
        self.gap = False       # broadcasts were missed since `known`
        self.flush_needed = False
        self.known = None      # every invalidation up to this tid is applied or pending
        self.tid = None        # the snapshot of the current transaction
        self._late = (0, 0)    # broadcast numbers a sync found missing (see synced)
        self._statics = set()  # static paths changed, not yet applied (None: unknown ones)

    # -- learning ------------------------------------------------------------

    def follow(self, server, seq):
        """Take broadcasts from server instance `server`, whose last was
        number `seq` (a hello reply's); another instance than before
        means a flush at the next boundary."""
        if self.server is not None and server != self.server:
            self.flush_needed = True
        self.server = server
        self.seq = seq
        self._late = (0, 0)

    def restarted(self):
        """Another server instance answered (a restart): what is known of
        invalidations may have holes."""
        self.gap = True
        self.flush_needed = True

    def drain(self, timeout=0):
        """Take the waiting broadcasts into the pending invalidations,
        waiting up to `timeout` s for one."""
        for message in self._conn.broadcasts(timeout=timeout):
            self.receive(message)

    def receive(self, message):
        """Take one broadcast (a map checked by protocol.check_broadcast)."""
        if message["srv"] != self.server:
            return  # another instance (before or after a restart): sync covers it
        if self.seq is not None and message["seq"] != self.seq + 1:
            if self._late[0] < message["seq"] <= self._late[1]:
                return  # accounted for by a sync, in synced()
            self.gap = True
            self.flush_needed = self.flush_needed or message["seq"] <= self.seq
            self._statics.add(None)  # unknown static changes: drop them all
        self.seq = message["seq"]
        tid = message["tid"]
        if tid is None:
            self._statics.update(tuple(p) for p in message["statics"])
            return
        if self.known is not None and tid <= self.known:
            return
        if self.gap or message["prev"] != self.known:
            # A gap: the sync (or commit) that closes it names every oid
            # changed since `known`, so of what comes meanwhile only the
            # newest tid is kept (for poll): a client that only aborts, and
            # so never closes it, kept every broadcast.
            self.gap = True
            while self.pending and (self.known is None or self.pending[-1][0] > self.known):
                self.pending.pop()
            self.pending.append((tid, frozenset(), {}))
            return
        oids = frozenset(message["oids"])
        states = {}
        for oid, sealed in message.get("states", ()):
            # For objects whose state we hold: unsealed now, applied at the
            # next boundary if still the newest.
            proxy = self._cache.get(("o", oid))
            if proxy is not None and proxy._state is not None and oid in oids:
                record = self._record(unseal(proxy._key.mac, message["srv"], tid, sealed), tid)
                if record is not None:
                    states[oid] = record
        self.pending.append((tid, oids, states))
        self.known = tid
        if len(self.pending) > MAX_PENDING:
            # A client that waits for broadcasts and never reaches a boundary
            # kept them all.  Back to what is applied: the next sync or commit
            # names every oid changed since the snapshot.
            self.pending = [(tid, frozenset(), {})]
            self.known = self.tid
            self.gap = True

    def poll(self, tid=None):
        """Take the broadcasts that come within POLL s; return (done, newest).

        done is true if `tid` (any tid, if None) is known or broadcast;
        newest is the highest tid broadcast so far (`known` if `tid` was
        known already), or None.
        """
        if tid is not None and self.known is not None and tid <= self.known:
            return True, self.known
        self.drain(POLL)
        seen = max((p[0] for p in self.pending), default=None)
        return seen is not None and (tid is None or seen >= tid), seen

    # -- boundaries ------------------------------------------------------------

    def synced(self, tid, changed, seq):
        """Move to snapshot `tid` of a sync reply: `changed` oids since
        `known` (None if unknown), `seq` the number of the server's last
        broadcast before it (None from an old server)."""
        self.drain()
        if seq is not None and self.seq is not None and seq > self.seq:
            # Lost (the last ones: no later number reveals them) or late: the
            # sync covers their transactions, not statics; late ones are skipped.
            self._statics.add(None)
            self._late, self.seq = (self.seq, seq), seq
        self.advance(tid, changed)

    def committed(self, tid, changed, states):
        """Move to snapshot `tid` of a commit reply: `changed` as for
        synced, `states` the (key token, record data) of what it wrote."""
        self.drain()
        self.advance(tid, changed, states)

    def aborted(self):
        """Move to the newest snapshot the broadcasts prove complete, if any."""
        self.drain()
        if not self.gap and self.known is not None:
            self.advance(self.known, [])

    def advance(self, tid, changed, states=()):
        """Apply every invalidation up to `tid` and make it the snapshot.

        `states` lists (key token, record data) of objects as of `tid`.
        """
        if changed is None or self.flush_needed:
            pushed = {}
            self._flush()
        else:
            pushed = self._pushed_states(tid)
            oids = set(changed)
            for pending_tid, pending_oids, _states in self.pending:
                if pending_tid <= tid:
                    oids.update(pending_oids)
            self._invalidate(oids)
        self.pending = [p for p in self.pending if p[0] > tid]
        if self._statics:
            # Searches of a static mapping depend on no oid: on any static.
            for entry, (_result, deps) in list(self._searches.items()):
                if deps is None:
                    del self._searches[entry]
        if None in self._statics:
            for proxy in list(self._cache.values()):
                if proxy._key.kind == "s":
                    proxy._ghostify()
        else:
            for path in self._statics:
                proxy = self._cache.get(("s", path))
                if proxy is not None:
                    proxy._ghostify()
        self._statics = set()
        if self.gap or self.known is None or self.known < tid:
            self.known = tid
        # Else broadcasts after `tid` are pending, received in order: still known.
        self.tid = tid
        self.gap = self.flush_needed = False
        for token, data in states:
            proxy = self._cache.get(token)
            if proxy is not None and proxy._state is None:
                record = self._record(data, None)
                if record is not None:
                    self._take(proxy, record)
        for oid, record in pushed.items():
            proxy = self._cache.get(("o", oid))
            if proxy is not None and proxy._state is None:
                self._take(proxy, record)

    def _pushed_states(self, tid):
        """{oid: record} of broadcast states that are the newest as of `tid`.

        Only when every broadcast up to `tid` is here: otherwise a newer
        change of the object could be among those missed.
        """
        if self.gap or self.known is None or self.known < tid:
            return {}
        newest = {}
        for pending_tid, oids, states in self.pending:
            if pending_tid <= tid:
                for oid in oids:
                    # Changed: no state unless this broadcast brought it.
                    newest[oid] = states.get(oid)
        return {oid: record for oid, record in newest.items() if record is not None}

    def _invalidate(self, oids):
        if not oids:
            return
        for oid in oids:
            proxy = self._cache.get(("o", oid))
            if proxy is not None:
                proxy._ghostify()
            for watcher in self._watch.pop(oid, ()):
                watcher._ghostify()
        for entry, (_result, deps) in list(self._searches.items()):
            if deps is None or not oids.isdisjoint(deps):
                del self._searches[entry]

    def _flush(self):
        for proxy in list(self._cache.values()):
            proxy._ghostify()
        self._searches.clear()
        self._watch.clear()
        self.pending = []
