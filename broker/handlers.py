"""What the server does for each request op, against the database.

One method per op of broker.protocol.REQUESTS, named op_<op>, taking the
validated fields and returning the reply's "ok" value (or raising, which
becomes the reply's "error").  Reads happen at the client's snapshot tid:
object states come from db.load_state(oid, tid), as encoded state records
(broker.states) that the server's StateCache keeps; mappings, B-trees and
the object graph a class search walks are read through broker.snapshots,
as of the snapshot too.  Writes (commit, call, invoke) each run in one
Dobbin transaction of the calling worker thread, and check each old value
a client sent on the object as checked out for the change.
"""

import itertools
import logging

import transaction

from broker.codec import ABSENT, Codec
from broker.exc import (AccessDenied, ConflictError, EncodeError, MultipleResultsError,
                        NoResultError, ProtocolError, ReadConflictError, ResultLost)
from broker.export import class_name, hidden_item, visible_instances, visible_items
from broker.keys import Key
from broker.outcomes import (COMMIT_MARK, Recorded, check_created, commit_mark, commit_reply,
                             ok_value, page_value)
from broker.protocol import VERSION
from broker.snapshots import Snapshot, tree_lookup
from broker.states import Record
from broker.values import (Touched, as_sent, changed_in_transaction, check_sendable,
                           new_object, not_a_key, placeholder_key, resolve_values,
                           same_value, streams_as_keys)
from dobbin.exc import ConflictError as StoreConflictError
from dobbin.btree import OOBTree
from dobbin.bucket import _check_key
from dobbin.exc import HistoryError, ObjectGraphError
from dobbin.persistent import Persistent, checkout, state_of
from dobbin.stream import PersistentStream

logger = logging.getLogger("broker.server")

COMMIT_ATTEMPTS = 3
MAX_SCAN = 1000000
# Fresh looks for the bucket of an item to write, each one after a
# concurrent split or unlink moved it.
TREE_RESTARTS = 20


class Handlers:
    """The request handlers of one BrokerServer."""

    def __init__(self, server):
        self.server = server
        self.db = server.db
        self.exports = server.exports
        self.keyring = server.keyring
        # Encodes records only to see that they fit (see check_sendable).
        self.sizing_codec = Codec(default=placeholder_key, max_message=server.max_message)

    # -- resolving keys ------------------------------------------------------

    def resolve(self, key, created=None):
        """Return the object a verified key names (new objects from `created`)."""
        if key.kind == "o":
            try:
                return self.db.get(key.ident)
            except KeyError:
                raise KeyError("no object with %s" % key) from None
        if key.kind == "s":
            return self.server.static_object(key.ident)
        if key.kind == "n" and created is not None:
            try:
                return created[key.ident]
            except KeyError:
                raise ProtocolError("commit refers to undeclared %s" % key) from None
        raise AccessDenied("a %s key is not allowed here" % key)

    def resolve_values(self, value, created=None, memo=None, storing=False):
        """`broker.values.resolve_values`, keys naming objects of the
        database, of the server's statics, or `created` by a commit."""
        return resolve_values(value, lambda key: self.resolve(key, created), memo, storing)

    # -- reading at a snapshot ---------------------------------------------

    def catch_up(self, tid):
        """Make sure this server's database knows transaction `tid`."""
        if tid > self.db.last_tid:
            self.db.sync()
            if tid > self.db.last_tid:
                raise ProtocolError("transaction %d is unknown to this database" % tid)

    def state_at(self, obj, tid):
        """Return (rules, serial, readable state) of persistent `obj` at `tid`."""
        self.catch_up(tid)
        return self._readable_state(obj, tid)

    def _readable_state(self, obj, tid):
        serial, state = self._state_as_of(obj, tid)
        rules = self.exports.lookup(type(obj))
        return rules, serial, rules.filter_state(state)

    def _state_as_of(self, obj, tid):
        try:
            return self.db.load_state(obj._p_oid, tid)
        except HistoryError:
            raise self._read_conflict(obj, tid) from None

    def _read_conflict(self, obj, tid):
        key = self.keyring.sign("o", obj._p_oid)
        return ReadConflictError("%s cannot be read as of transaction %d; begin() again"
                                 % (key, tid), key=str(key))

    def snapshot(self, tid, mapping=None):
        """A broker.snapshots.Snapshot as of `tid`, which the database knows;
        its read conflicts name `mapping`, if given (what the client asked
        for: it has no key of the nodes of a B-tree)."""
        return Snapshot(self.db, tid,
                        lambda obj: self._read_conflict(obj if mapping is None else mapping,
                                                        tid))

    def record(self, obj, tid):
        """Return the encoded state record of persistent `obj` as of snapshot `tid`."""
        oid = obj._p_oid
        cache = self.server.states
        data = cache.get(oid, tid)
        if data is None:
            top = cache.top
            self.catch_up(tid)
            serial, data = self.make_record(obj, tid)
            if tid == top:
                cache.put(oid, serial, data, top)
        return data

    def make_record(self, obj, tid):
        """Return (serial, encoded record) of `obj` as of `tid`, which the database knows."""
        oid = obj._p_oid
        rules, serial, state = self._readable_state(obj, tid)
        state = streams_as_keys(state, oid, self._stream_key)
        return serial, self.server._codec.encode(
            {"class": rules.name, "serial": serial, "state": state})

    def _stream_key(self, oid, name):
        return self.keyring.sign("f", (oid, name))

    def records_of(self, tid, oids):
        """Return {oid: record} of the objects transaction `tid` changed (those that can be read).

        Called from the database's commit callback: no catching up here.
        """
        records = {}
        for oid in oids:
            try:
                serial, data = self.make_record(self.db.get(oid), tid)
            except Exception:
                logger.debug("no state record of oid %d at %d", oid, tid, exc_info=True)
                continue
            if serial == tid:
                records[oid] = data
        return records

    def static_state(self, obj):
        rules = self.exports.lookup(type(obj))
        if rules.fields is None:
            # Every public, non-callable attribute, class-level ones included.
            state = {}
            for name in dir(obj):
                if not name.startswith("_"):
                    value = getattr(obj, name, None)
                    if not callable(value):
                        state[name] = value
        else:
            state = {n: getattr(obj, n) for n in rules.fields | rules.refs if hasattr(obj, n)}
        return rules, rules.filter_state(state)

    def mapping_at(self, obj, tid, read):
        """Return (read(items), deps): `read` applied to the items of mapping
        `obj` that clients see, as of `tid` (a static's as they are).

        `deps` lists the oids whose change invalidates what was read (None:
        any change).  `read` may be called more than once.
        """
        rules = self.exports.lookup(type(obj))
        if not rules.mapping:
            raise AccessDenied("%s objects are not mappings" % rules.name)
        if not isinstance(obj, Persistent):
            return read(visible_items(rules, obj)), None  # a static: no history
        self.catch_up(tid)
        # A PersistentDict's live state too, not a copy: an item read once
        # copied the whole mapping (a large value in it made every read slow).
        snapshot = self.snapshot(tid, obj)
        # Read, then checked: a check first would let a commit landing
        # while we read show through.
        result = snapshot.run(lambda: read(visible_items(rules, snapshot.mapping(obj))))
        return result, snapshot.oids()

    # -- ops -------------------------------------------------------------------

    def op_ping(self, f):
        return None

    def op_hello(self, f):
        server = self.server
        return {"version": VERSION, "broadcast": server.broadcast_address,
                "tid": self.db.last_tid, "root": self.root_key(),
                "server": server.instance, "seq": server.broadcast_seq,
                "name": server.name}

    def root_key(self):
        root = self.db.root
        return None if root is None else self.keyring.sign("o", root._p_oid)

    def op_sync(self, f):
        # Read first: every broadcast up to it is of a static or of a
        # transaction up to the tid below, which "changed" covers.
        seq = self.server.broadcast_seq
        tid = self.server.sync_database()
        return {"tid": tid, "changed": self.server.history.changes(f["since"], tid),
                "root": self.root_key(), "seq": seq}

    def op_meta(self, f):
        rules = self.exports.by_name(f["class"])
        if rules is None:
            raise KeyError("no exported class %r" % f["class"])
        return rules.meta()

    def op_static(self, f):
        obj = self.server.static_object(f["path"])
        if isinstance(obj, Persistent):  # stored (see add_static): its own key
            return self.server.key_for(obj)
        # The path asked for: the object's first path may come to serve another.
        return self.server.keyring.sign("s", tuple(f["path"]))

    def op_load(self, f):
        key, tid = f["key"], f["tx"]
        obj = self.resolve(key)
        if key.kind == "s" and not isinstance(obj, Persistent):
            rules, state = self.static_state(obj)
            return {"class": rules.name, "serial": None, "state": state}
        return Record(self.record(obj, tid))

    def op_item(self, f):
        obj = self.resolve(f["key"])
        item = self.resolve_values(f["item"])
        try:
            if isinstance(obj, OOBTree):
                return self.tree_item(obj, item, f)
            value, deps = self.mapping_at(
                obj, f["tx"], lambda items: [items[item]] if item in items else [])
        except TypeError as error:
            raise not_a_key(f["key"], item, error) from None
        return {"value": value, "deps": deps}

    def tree_item(self, tree, item, f):
        """op_item of a B-tree: a lookup reads one path of it, not all of it."""
        tid = f["tx"]
        self.catch_up(tid)
        rules = self.exports.lookup(type(tree))
        if hidden_item(rules, item):
            return {"value": [], "deps": [tree._p_oid]}
        _check_key(item)  # TypeError for an unhashable, None or NaN item
        snapshot = self.snapshot(tid, tree)
        value, path = snapshot.run(lambda: tree_lookup(snapshot, tree, item))
        return {"value": [] if value is ABSENT else [value],
                "deps": [node._p_oid for node in path]}

    def op_items(self, f):
        def page(items):
            length = len(items)
            # Clamped: islice refuses positions past sys.maxsize.
            start = min(f["start"], length)
            end = min(start + (f["limit"] or 1000), length)
            return length, start, [[k, v] for k, v in
                                   itertools.islice(items.items(), start, end)]

        obj = self.resolve(f["key"])
        (length, start, items), deps = self.mapping_at(obj, f["tx"], page)
        return Record(page_value(self.server._codec, items, lambda head: {
            "items": head, "more": start + len(head) < length, "len": length, "deps": deps}))

    def op_stream(self, f):
        oid, field = f["key"].ident
        obj = self.resolve(Key("o", oid))
        _rules, _serial, state = self.state_at(obj, f["tx"])
        stream = state.get(field)
        if not isinstance(stream, PersistentStream):
            raise KeyError("%s has no stream %r" % (f["key"], field))
        # Not open/seek/read: every copy of the state shares this stream
        # object, and with it one position, while workers serve many readers.
        size = stream.size
        return {"data": stream.read_at(min(f["offset"], size), f["size"]), "size": size}

    # -- writes ----------------------------------------------------------------

    def op_commit(self, f):
        """Apply a commit request.  The server adds to its fields the request's
        "rid" and, for a copy of a commit an earlier server ran, that one's
        "recorded" outcome (see broker.outcomes); this sets "committed" (to
        its `Recorded` form) once the transaction is.  Once it is, the reply
        cannot fail for its size."""
        if f["recorded"] is not None:
            return self.recorded_commit(f, f["recorded"])
        check_created(len(f["new"]), self.server._codec)
        for _attempt in range(COMMIT_ATTEMPTS):
            txn = transaction.begin()
            before = self.db.committed_tid
            try:
                touched = self.apply_commit(f)
                check_sendable(touched, self.exports, self.sizing_codec)
                mark = commit_mark(f["token"], f["rid"], touched.created)
                txn.setExtendedInfo(COMMIT_MARK, mark)
                transaction.commit()
                f["committed"] = self._record_of_commit(before, touched.created)
            except StoreConflictError:
                transaction.abort()
                continue
            except ObjectGraphError as error:
                transaction.abort()
                numbers = [n for n, obj in touched.created.items() if obj is error.obj]
                if not numbers:
                    raise
                raise ProtocolError("new object #%d (%s) is not reachable from the root: "
                                    "link it from a stored object in the same commit"
                                    % (numbers[0], class_name(type(error.obj)))) from None
            except BaseException:
                transaction.abort()
                raise
            break
        else:
            raise ConflictError("the commit kept conflicting with concurrent writers")
        # A snapshot at or after our commit, with every change up to it known.
        tid = self.server.sync_database()
        created = [[num, self.keyring.sign("o", obj._p_oid)]
                   for num, obj in touched.created.items() if obj._p_oid is not None]
        return Record(commit_reply(
            {"tid": tid, "created": created, "root": self.root_key(), "states": [],
             "changed": self.server.history.changes(f["since"], tid)},
            self.states_at(touched, tid), self.server._codec))

    def _record_of_commit(self, before, created):
        """The `Recorded` form of the transaction this thread just committed
        (the thread's committed tid was `before`), which made `created`."""
        tid = self.db.committed_tid
        return Recorded(None if tid == before else tid,
                        [(num, obj._p_oid) for num, obj in created.items()
                         if obj._p_oid is not None])

    def recorded_commit(self, f, recorded):
        """The reply to a commit that ran before a restart: as its own server
        would have answered, less the states (the client loads them)."""
        tid = self.server.sync_database()
        return {"tid": tid,
                "created": [[num, self.keyring.sign("o", oid)] for num, oid in recorded.created],
                "changed": self.server.history.changes(f["since"], tid),
                "root": self.root_key(), "states": []}

    def states_at(self, objects, tid):
        """Yield (key, record) at `tid` of the stored ones among `objects`
        (for a commit reply)."""
        seen = set()
        for obj in objects:
            oid = obj._p_oid
            if oid is None or oid in seen:
                continue
            seen.add(oid)
            try:
                record = self.record(obj, tid)
            except Exception:
                # The commit is done; a missing state only costs the client a load.
                logger.debug("no state record of oid %d at %d", oid, tid, exc_info=True)
                continue
            yield self.keyring.sign("o", oid), record

    def apply_commit(self, f):
        """Check and apply one commit message in the current transaction."""
        touched = Touched()
        created = touched.created
        for num, cname, fields in f["new"]:
            rules = self.exports.by_name(cname)
            if rules is None or not rules.creatable:
                raise AccessDenied("clients may not create %s objects" % cname)
            if num in created:
                raise ProtocolError("commit declares new object #%d twice" % num)
            created[num] = obj = new_object(rules.cls)
            checkout(obj)
            touched.append(obj)
        # One copy of each shared part of the stored values; the values
        # only compared (old ones, deleted items) are resolved apart, as
        # they may hold what must not be stored.
        stored_memo, compared_memo = {}, {}

        def stored(value):
            return self.resolve_values(value, created, stored_memo, storing=True)

        def compared(value):
            return value if value is ABSENT else self.resolve_values(value, created,
                                                                      compared_memo)

        for num, cname, fields in f["new"]:
            obj, rules = created[num], self.exports.by_name(cname)
            for name, value in fields.items():
                self._check_writable(rules, name, Key("n", num))
                setattr(obj, name, stored(value))
        # Old values are checked against what clients see (class defaults
        # included, hidden fields absent), and before the names are, so
        # that a refusal tells a hidden name from an absent one no more
        # than a read does.
        for key, name, old, new in f["set"]:
            obj, rules = self._writable_object(key, created, touched)
            if key.kind != "n":
                self._verify(key, name, rules.value_seen(state_of(obj), name), compared(old))
            self._check_writable(rules, name, key)
            setattr(obj, name, stored(new))
        for key, name, old in f["del"]:
            obj, rules = self._writable_object(key, created, touched)
            self._verify(key, name, rules.value_seen(state_of(obj), name), compared(old))
            self._check_writable(rules, name, key)
            if name in state_of(obj):
                delattr(obj, name)
        # A hidden item is absent to clients, here as in reads (so a
        # guessed old value gets no answer), and they cannot set it.
        for key, item, old, new in f["setitem"]:
            mapping, rules = self._writable_mapping(key, created, touched)
            item = stored(item)
            self._verify(key, item, self._current_item(mapping, rules, key, item),
                         compared(old), created)
            if hidden_item(rules, item):
                raise AccessDenied("this item of %s cannot be set by clients" % key)
            value = stored(new)
            self._mutate(mapping, touched, lambda m: m.__setitem__(item, value))
            touched.items.append((key, item, value))  # see check_sendable
        for key, item, old in f["delitem"]:
            mapping, rules = self._writable_mapping(key, created, touched)
            item = compared(item)
            current = self._current_item(mapping, rules, key, item)
            self._verify(key, item, current, compared(old), created)
            if current is not ABSENT:
                self._mutate(mapping, touched, lambda m: m.__delitem__(item))
        return touched

    def _writable_object(self, key, created, touched):
        obj = self.resolve(key, created)
        if not isinstance(obj, Persistent):
            raise AccessDenied("%s cannot be changed by clients" % key)
        checkout(obj)
        touched.append(obj)
        return obj, self.exports.lookup(type(obj))

    def _writable_mapping(self, key, created, touched):
        obj = self.resolve(key, created)
        rules = self.exports.lookup(type(obj))
        if not isinstance(obj, Persistent) or not rules.mapping or rules.readonly is True:
            raise AccessDenied("items of %s cannot be changed by clients" % key)
        if not isinstance(obj, OOBTree):
            # Before its items are read for checking: a commit landing
            # after the checkout makes ours conflict, one landing before it
            # shows in the check.  (B-trees: see _current_item.)
            checkout(obj)
        return obj, rules

    @staticmethod
    def _current_item(mapping, rules, key, item):
        """The value of `item` in `mapping` (checked out) that clients see,
        or ABSENT; ProtocolError if it cannot be a key."""
        if hidden_item(rules, item):
            return ABSENT
        try:
            if isinstance(mapping, OOBTree):
                return _tree_item_to_write(mapping, item)
            return mapping.get(item, ABSENT)
        except TypeError as error:
            raise not_a_key(key, item, error) from None

    @staticmethod
    def _mutate(mapping, touched, change):
        change(mapping)  # checked out already (B-trees check out their own buckets)
        touched.append(mapping)

    @staticmethod
    def _check_writable(rules, name, key):
        if not rules.writable(name):
            if rules.readable(name) and not rules.behaviour(name):
                raise AccessDenied("%s.%s of %s is read-only for clients"
                                   % (rules.name, name, key))
            # Never echo a name clients cannot see: that would confirm a
            # hidden field, or a method that is not exported.
            raise AccessDenied("%s of %s has no such attribute for clients" % (rules.name, key))

    def _verify(self, key, field, current, old, created=None):
        """ConflictError unless `current` is `old`; an item `field` is named
        with its objects by their keys, those `created` by number."""
        if not same_value(current, old):
            if not isinstance(field, str):
                numbers = {id(obj): num for num, obj in (created or {}).items()}
                field = repr(as_sent(field, lambda obj: Key("n", numbers[id(obj)])
                                     if id(obj) in numbers else self.server.key_for(obj)))
            raise ConflictError(key=str(key), field=field)

    def _run_in_transaction(self, f, func, args, kwargs):
        """Run an application method for call/invoke request `f` in a
        transaction marked, as a commit's is, with the request's token; set
        f["committed"] (see op_commit) once it is, and return its result
        encoded (a Record).
        A result that cannot be sent is ResultLost: the method ran."""
        name = f.get("method", f.get("name"))
        if f["recorded"] is not None:
            tid = f["recorded"].tid
            raise ResultLost("%r ran already (%s), before the server restarted or while many "
                             "others finished; its result was not kept"
                             % (name, "wrote nothing" if tid is None else "transaction %d" % tid))
        txn = transaction.begin()
        before = self.db.committed_tid
        self.server._in_request(txn)  # the server's obj_update etc. join it
        try:
            txn.setExtendedInfo(COMMIT_MARK, commit_mark(f["token"], f["rid"], {}))
            result = func(*args, **kwargs)
            # As for a client's commit: nothing it stores may be unsendable.
            check_sendable(changed_in_transaction(self.db, self.exports), self.exports,
                           self.sizing_codec)
            transaction.commit()
        except BaseException:
            transaction.abort()
            raise
        finally:
            self.server._in_request(None)
        f["committed"] = self._record_of_commit(before, {})
        try:
            return Record(ok_value(self.server._codec, result))
        except EncodeError as error:
            raise ResultLost("%r ran and committed, but its result cannot be sent: %s"
                             % (name, error)) from None

    def op_call(self, f):
        method = getattr(self.server, "do_" + f["name"], None)
        if method is None or not callable(method):
            raise AttributeError("the server has no method %r" % f["name"])
        return self._run_in_transaction(
            f, method, self.resolve_values(f["args"]), self.resolve_values(f["kwargs"]))

    def op_invoke(self, f):
        obj = self.resolve(f["key"])
        rules = self.exports.lookup(type(obj))
        if not rules.callable(f["method"]):
            raise AccessDenied("%s.%s is not exported" % (rules.name, f["method"]))
        return self._run_in_transaction(
            f, getattr(obj, f["method"]), self.resolve_values(f["args"]),
            self.resolve_values(f["kwargs"]))

    # -- search ------------------------------------------------------------------

    def op_search(self, f):
        tid, query = f["tx"], self.resolve_values(f["query"])
        target = f["target"]
        if type(target) is Key:
            obj = self.resolve(target)
            candidates, deps = self.mapping_at(obj, tid, lambda items: list(items.values()))
        else:
            rules = self.exports.by_name(target)
            if rules is None or rules.cls not in self.exports.explicit_classes():
                raise AccessDenied("class %r is not exported for search" % target)
            self.catch_up(tid)
            if rules.extent is not None:
                candidates = list(rules.extent())
            else:
                candidates = self.instances_at(rules.cls, tid)
            deps = None
        matches, seen = [], set()
        for candidate in candidates:
            if isinstance(candidate, Persistent) and candidate._p_oid is not None:
                if candidate._p_oid in seen:
                    continue  # under several keys: one object, one result
                seen.add(candidate._p_oid)
                if deps is not None:
                    deps.append(candidate._p_oid)
                if self._matches(candidate, tid, query):
                    matches.append(candidate)
        mode = f["mode"]
        if mode == "count":
            result = len(matches)
        elif mode == "get":
            if not matches:
                raise NoResultError("no object matches %r" % (sorted(query),))
            if len(matches) > 1:
                raise MultipleResultsError("%d objects match %r" % (len(matches), sorted(query)))
            result = matches[0]
        else:
            result = matches[:f["limit"]] if f["limit"] else matches
        return {"result": result, "deps": deps}

    def instances_at(self, cls, tid):
        """The instances of `cls` clients can reach from the root as of `tid`."""
        root = self.db.root
        if root is None:
            return []
        snapshot = self.snapshot(tid)
        return snapshot.run(lambda: list(visible_instances(
            root, cls, self.exports, MAX_SCAN, snapshot.contents)))

    def _matches(self, obj, tid, query):
        try:
            rules, _serial, state = self.state_at(obj, tid)
        except ReadConflictError:
            return False  # did not exist yet at the snapshot
        for name, wanted in query.items():
            # A field clients cannot read matches nothing (no error: an error
            # would tell hidden fields from absent ones).
            if not rules.readable(name) or not same_value(state.get(name, ABSENT), wanted):
                return False
        return True


def _tree_item_to_write(tree, item):
    """The value of `item` in B-tree `tree`, or ABSENT, read from the bucket
    that holds it as checked out for the write: a commit changing the item
    after the checkout makes ours conflict (a bucket merges no two changes
    of one item, nor a split), one before it shows in the value."""
    _check_key(item)
    for _attempt in range(TREE_RESTARTS):
        found = tree._writable_bucket(item)
        if found is not None:  # None: split or unlinked before the checkout
            _path, _bucket, state, index, present = found
            return state["values"][index] if present else ABSENT
    raise StoreConflictError("the B-tree kept changing under the commit", oid=tree._p_oid)
