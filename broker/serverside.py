"""What a server's own code does to the objects it serves.

`Statics` holds the non-persistent objects exported under key paths the
application chooses.  `ServerSideChanges` is the part of `BrokerServer`
that changes objects for the application (obj_new, obj_update,
obj_delete) and serves statics (add_static, del_static, key_for).

Each change is all or nothing: a failing one leaves the thread's
transaction as it was before the call.  Called while the server runs an
exported method or a do_NAME method, a change joins that request's
transaction, which commits (once, checked as a client's commit is) when
the method returns; called from any other thread it commits at once.
"""

import threading

import transaction
from zope.interface import implementer

from broker import exc
from broker.interfaces import IStatics
from broker.keys import check_ident
from broker.values import (STREAMS, changed_in_transaction, check_reply, check_sendable,
                           new_object, stream_not_attribute)
from dobbin.persistent import Persistent, checkout


_ABSENT = object()


@implementer(IStatics)
class Statics:
    """Non-persistent objects by key path; an object may have several paths."""

    def __init__(self):
        self._lock = threading.Lock()
        self._objects = {}  # path -> object
        self._paths = {}    # id(object) -> its paths, oldest first, while registered

    def add(self, obj, path):
        """Serve `obj` at `path`; return the object it replaces there, or None."""
        with self._lock:
            replaced = self._objects.get(path)
            if replaced is not None:
                self._forget(replaced, path)
            self._objects[path] = obj
            self._paths.setdefault(id(obj), []).append(path)
            return replaced

    def remove(self, path):
        """Stop serving the object at `path`, and return it; KeyError if none."""
        with self._lock:
            obj = self._objects.pop(path, None)
            if obj is None:
                raise KeyError("no static object at %r" % (path,))
            self._forget(obj, path)
            return obj

    def _forget(self, obj, path):
        paths = self._paths[id(obj)]
        paths.remove(path)
        if not paths:
            # The object may go now, and its id() be another's.
            del self._paths[id(obj)]

    def get(self, path):
        """The object at `path`; KeyError if none."""
        try:
            return self._objects[tuple(path)]
        except KeyError:
            raise KeyError("no static object at %r" % (tuple(path),)) from None

    def path_of(self, obj):
        """The first path `obj` is served at, or None."""
        paths = self._paths.get(id(obj))
        return paths[0] if paths else None


def checked_path(path):
    """`path` as a tuple if a key can carry it; ExportError otherwise."""
    path = tuple(path)
    try:
        check_ident("s", path)
    except exc.AccessDenied:
        raise exc.ExportError("a static key path is 1 to 16 parts, each a str of at most 256 "
                              "characters or a 64-bit int, not %r" % (path,)) from None
    return path


def _checked_names(fields):
    for name in fields:
        if name.startswith("_"):
            # _p_ names are the database's; the others are never exported.
            raise exc.ExportError("cannot set the private name %r" % name)


class ServerSideChanges:
    """obj_new, obj_update, obj_delete and the statics, for BrokerServer."""

    def _init_server_side(self):
        self.statics = Statics()
        self._requests = threading.local()  # .transaction: the one a request runs in

    def _in_request(self, txn):
        """Mark `txn` (None: no more) as the transaction of the request this
        thread runs: changes made meanwhile join it (see the module)."""
        self._requests.transaction = txn
        self._requests.static_changes = []

    # -- statics -----------------------------------------------------------

    def add_static(self, obj, *path):
        path = checked_path(path)
        if isinstance(obj, Persistent) and obj._p_oid is None:
            # Clients could neither load it nor search it, and a commit
            # referring to it would store it as a side effect.
            raise exc.ExportError("%s is persistent but not stored: store it first, or serve "
                                  "a plain object" % type(obj).__name__)
        replaced = self.statics.add(obj, path)
        if replaced is not None and replaced is not obj:
            self._broadcast_statics([list(path)])

    def del_static(self, *path):
        path = checked_path(path)
        self.statics.remove(path)
        self._broadcast_statics([list(path)])

    def static_object(self, path):
        return self.statics.get(path)

    def key_for(self, obj):
        if isinstance(obj, Persistent) and obj._p_oid is not None:
            return self.keyring.sign("o", obj._p_oid)
        path = self.statics.path_of(obj)
        if path is not None:
            return self.keyring.sign("s", path)
        if isinstance(obj, STREAMS):
            raise stream_not_attribute()
        # Its type only: a repr shows fields and server addresses.
        raise exc.EncodeError("an object of type %s is neither stored nor static"
                              % type(obj).__name__)

    # -- changes -----------------------------------------------------------

    def obj_new(self, cls, **fields):
        # Like objects clients create: __init__ is not run, `fields` are the state.
        _checked_names(fields)
        obj = new_object(cls)
        self._change(lambda: _set_fields(obj, fields), commit=False)
        return obj

    def obj_update(self, obj, **fields):
        _checked_names(fields)
        if not isinstance(obj, Persistent):
            return self._change_static(
                obj, lambda: _set_plain_fields(obj, fields, lambda: self._check_static(obj)))
        return self._change(lambda: _set_fields(obj, fields), obj)

    def obj_delete(self, container, name):
        if not isinstance(container, Persistent):
            return self._change_static(container, lambda: _delete_plain(container, name))
        return self._change(lambda: _delete(container, name), container)

    def _change_static(self, obj, change):
        """Run `change` on static `obj` (it returns its undo) and broadcast
        it: now, or once the request's transaction it joins commits;
        undone if that transaction does not."""
        undo = change()
        txn = getattr(self._requests, "transaction", None)
        if txn is None or txn is not transaction.get():
            self._static_changed(obj)
            return None
        changes = self._requests.static_changes
        if not changes:
            txn.addAfterCommitHook(self._static_outcome, (changes,))
            txn.addAfterAbortHook(_undo_static, (changes,))
        changes.append((obj, undo))
        return None

    def _static_outcome(self, committed, changes):
        if not committed:
            _undo_static(changes)
            return
        for obj, _undo in changes:
            self._static_changed(obj)
        changes.clear()

    def _check_static(self, obj):
        """Raise ProtocolError unless a client could load static `obj`."""
        rules, state = self._handlers.static_state(obj)
        try:
            check_reply(self._codec, {"class": rules.name, "serial": None, "state": state})
        except (exc.EncodeError, exc.DecodeError) as error:
            raise exc.ProtocolError("the update would leave %s unsendable: %s"
                                    % (rules.name, error)) from None

    def _static_changed(self, obj):
        path = self.statics.path_of(obj)
        if path is not None:
            self._broadcast_statics([list(path)])

    def _change(self, change, obj=None, commit=True):
        """Run `change` (which checks out what it changes) in the thread's
        transaction, undone if it fails; then commit, unless a request's
        transaction takes it; return `obj`'s serial after."""
        savepoint = transaction.savepoint(optimistic=True)
        try:
            change()
        except BaseException:
            savepoint.rollback()
            raise
        if not commit or getattr(self._requests, "transaction", None) is transaction.get():
            return None
        try:
            # As for a client's commit: nothing stored may be unsendable.
            check_sendable(changed_in_transaction(self.db, self.exports), self.exports,
                           self._handlers.sizing_codec)
        except BaseException:
            savepoint.rollback()  # refused: what the thread had before stays
            raise
        try:
            transaction.commit()
        except BaseException:
            transaction.abort()  # a failed commit leaves nothing to keep
            raise
        return obj._p_serial


def _set_fields(obj, fields):
    if isinstance(obj, Persistent):
        checkout(obj)
    for name, value in fields.items():
        setattr(obj, name, value)


def _set_plain_fields(obj, fields, check):
    """Set the fields of a static object, all or none: none if `check()`
    raises; return the function that sets them back."""
    before = {name: getattr(obj, name, _ABSENT) for name in fields}

    def undo():
        for name, value in before.items():
            if value is _ABSENT:
                if hasattr(obj, name):
                    delattr(obj, name)
            else:
                setattr(obj, name, value)

    try:
        for name, value in fields.items():
            setattr(obj, name, value)
        check()
    except BaseException:
        undo()
        raise
    return undo


def _delete_plain(container, name):
    """Delete item or attribute `name` of a static object; return the
    function that puts it back."""
    if hasattr(container, "keys") and hasattr(container, "__delitem__"):
        value = container[name]
        del container[name]
        return lambda: container.__setitem__(name, value)
    value = getattr(container, name)
    delattr(container, name)
    return lambda: setattr(container, name, value)


def _undo_static(changes):
    """Undo a request's static changes, the latest first."""
    while changes:
        _obj, undo = changes.pop()
        undo()


def _delete(container, name):
    checkout(container)
    if hasattr(container, "keys") and hasattr(container, "__delitem__"):
        del container[name]
    else:
        delattr(container, name)
