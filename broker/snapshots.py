"""Reading persistent objects as they were at a client's snapshot.

A client transaction reads the database as of one tid.  `Snapshot` gives
the state of each object as of that tid: the live (shared, committed)
state when the object did not change after the tid, which costs neither a
copy nor a disk read, or else its older version from the log's history
(`db.load_state(oid, tid)`).  Whether a live state is still the one as of
the tid shows only after it was read (another thread's commit may replace
it at any moment), so `Snapshot.run` reads first and checks afterwards,
and reads again, from the history, what changed meanwhile.

B-trees are read through their nodes' and buckets' states (`TreeView`,
`tree_lookup`), so that a tree changed after the snapshot is still read
as it was, not refused.
"""

from bisect import bisect_left, bisect_right

from zope.interface import implementer

from broker.codec import ABSENT
from broker.export import visible_items
from broker.interfaces import ISnapshot
from dobbin.btree import OOBTree
from dobbin.bucket import Node
from dobbin.exc import HistoryError
from dobbin.persistent import Persistent, PersistentDict, committed_state

# Passes that read live states before a read takes every state from the
# history: each pass after the first reads from the history what changed
# during the ones before, so more are needed only under a stream of commits.
LIVE_PASSES = 3


@implementer(ISnapshot)
class Snapshot:
    """States of the objects of `db` as of transaction `tid` (which the
    database knows already).

    `conflict(obj)` makes the error raised when `obj` has no version as of
    `tid` (or, for a mapping of a kind not read through its states, when it
    changed after `tid`).
    """

    def __init__(self, db, tid, conflict):
        self.db = db
        self.tid = tid
        self._conflict = conflict
        self._stale = set()          # oids whose live state is newer: read from the history
        self._history_only = False
        self._live = []              # objects whose live state this pass used
        self._oids = []              # oids whose state this pass used

    def run(self, read):
        """Return `read()`, every state it took through `state` being the one
        as of the snapshot."""
        for _pass in range(LIVE_PASSES):
            self._live, self._oids = [], []
            try:
                result = read()
            except Exception:
                # A read that met a state newer than the snapshot (half of a
                # concurrent split, say) proves nothing: it is read again.
                if self._settled():
                    raise
                continue
            if self._settled():
                return result
        self._history_only = True
        self._live, self._oids = [], []
        return read()

    def oids(self):
        """The oids of the objects the last pass read: what its result depends on."""
        return list(dict.fromkeys(self._oids))

    def state(self, obj):
        """The state of persistent `obj` as of the snapshot (not to be changed)."""
        oid = obj._p_oid
        self._oids.append(oid)
        if self._history_only or oid in self._stale:
            try:
                return self.db.load_state(oid, self.tid)[1]
            except HistoryError:
                raise self._conflict(obj) from None
        state = committed_state(obj)
        self._live.append(obj)
        return state

    def _settled(self):
        """Were the live states this pass used the ones as of the snapshot?
        Those that were not are read from the history from now on."""
        if not self._live:
            return True
        # A commit publishes each state and then its serial: once it is
        # done, each serial read is at least that of the state read before.
        self.db.await_publication()
        tid = self.tid
        newer = {obj._p_oid for obj in self._live if obj._p_serial > tid}
        self._stale.update(newer)
        return not newer

    def mapping(self, obj, state=None):
        """The items of persistent mapping `obj` as of the snapshot (`state`:
        its state, if read already)."""
        if isinstance(obj, OOBTree):
            return TreeView(self, obj)
        if isinstance(obj, PersistentDict):
            return (self.state(obj) if state is None else state).get("_data", {})
        # Another kind of mapping, whose parts' old states we cannot read as
        # a mapping: its live items, if none of its parts changed after tid.
        parts = internal_nodes(obj)
        if self._history_only or any(part._p_oid in self._stale for part in parts):
            raise self._conflict(obj)
        self._live.extend(parts)
        self._oids.extend(part._p_oid for part in parts)
        return obj

    def contents(self, obj, rules):
        """What a walk of the object graph goes on into from persistent `obj`
        (see broker.export.visible_instances): its readable fields and its
        visible items, as of the snapshot."""
        state = self.state(obj)
        found = [rules.filter_state(state)]
        if rules.mapping:
            found.extend(visible_items(rules, self.mapping(obj, state)).values())
        return found


class TreeView:
    """The items of B-tree `tree` as of `snapshot`, read lazily, in key order."""

    def __init__(self, snapshot, tree):
        self._snapshot = snapshot
        self._tree = tree

    def __len__(self):
        state = self._snapshot.state
        return max(0, state(state(self._tree)["_length"])["value"])

    def items(self):
        state = self._snapshot.state
        return _leaf_items(state, state(self._tree)["_root"])

    def values(self):
        return (value for _key, value in self.items())

    def keys(self):
        return (key for key, _value in self.items())

    __iter__ = keys

    def __contains__(self, key):
        return tree_lookup(self._snapshot, self._tree, key)[0] is not ABSENT

    def __getitem__(self, key):
        value = tree_lookup(self._snapshot, self._tree, key)[0]
        if value is ABSENT:
            raise KeyError(key)
        return value


def _leaf_items(state, node):
    # type(), not isinstance(): isinstance would load a ghost bucket to ask
    # its __class__.
    if type(node) is Node:
        for child in state(node)["children"]:
            yield from _leaf_items(state, child)
    else:
        bucket = state(node)
        yield from zip(bucket["keys"], bucket["values"])


def tree_lookup(snapshot, tree, key):
    """(value or ABSENT, path) of `key` in B-tree `tree` as of `snapshot`;
    `path` lists the objects read: the tree, its nodes down to the bucket.

    No moving right past a concurrent split: in the states of one snapshot
    there is none (a pass that met one is read again).  TypeError for a
    key not ordered with the tree's keys.
    """
    state = snapshot.state
    path = [tree]
    node = state(tree)["_root"]
    while type(node) is Node:
        path.append(node)
        node_state = state(node)
        children = node_state["children"]
        if not children:
            return ABSENT, path  # unlinked: only met in a torn read, read again
        node = children[bisect_right(node_state["keys"], key)]
    path.append(node)
    bucket = state(node)
    keys = bucket["keys"]
    index = bisect_left(keys, key)
    if index < len(keys) and not key < keys[index]:
        return bucket["values"][index], path
    return ABSENT, path


def internal_nodes(mapping):
    """The mapping itself and the persistent objects inside it that are not values."""
    values = {id(v) for v in mapping.values() if isinstance(v, Persistent)}
    found = [mapping]
    # Plain containers too, each once: a client may have stored a list
    # holding itself.  Each is kept alive here, so that no id is reused.
    seen = {id(mapping): mapping}
    stack = [committed_state(mapping)]
    while stack:
        value = stack.pop()
        if not isinstance(value, (Persistent, dict, list, tuple)) or id(value) in seen:
            continue
        seen[id(value)] = value
        if isinstance(value, Persistent):
            if id(value) in values:
                continue
            found.append(value)
            stack.append(committed_state(value))
        elif isinstance(value, dict):
            stack.extend(value.values())
        else:
            stack.extend(value)
    return found
