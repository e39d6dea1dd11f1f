"""Persistent objects: shared read-only state, thread-private checkouts.

An object's committed state is its instance `__dict__`, shared by every
thread and never changed in place: a commit or a catch-up replaces the
whole dict.  `checkout(obj)` gives the calling thread a deep copy (other
persistent objects are kept by identity), stored in `obj._p_local`
under the thread's id.  Attribute access finds that copy first, so the
change is invisible to other threads until the transaction commits.
"""

import functools
import threading
from collections.abc import ItemsView, KeysView, MutableMapping, ValuesView

from zope.interface import implementer

from dobbin.classes import (MISSING, class_attribute, class_dunders, data_descriptor_names,
                            descriptor_names, dunders_of, is_data_descriptor)
from dobbin.exc import BrokenObjectError, DobbinError, InvalidTypeError, ReadOnlyError
from dobbin.interfaces import IPersistent, IPersistentDict
from dobbin.session import (KeepPersistent, _threads, committing_threads, copy_state,
                            current_session, current_thread_key, named, thread_key)
from dobbin.stream import PersistentFile

# PersistentFile lives in dobbin.stream; the user's guide imports it from here.
__all__ = ["Persistent", "PersistentDict", "PersistentFile", "checkout", "checked_out",
           "state_of", "working_copy"]

_get_ident = threading.get_ident
_object_getattribute = object.__getattribute__
_object_setattr = object.__setattr__
_READ_ONLY = "Can't set attribute in read-only mode."
# Creating the per-object checkout table races between threads.
_local_table_lock = threading.Lock()


def working_copy(obj):
    """The calling thread's working copy of checked-out `obj`, or None.

    Unlike `state_of`, never the shared state: after a commit, the shared
    state may be the very dict that was the working copy.
    """
    table = _get_local(obj)
    if table:
        return table.get(current_thread_key())
    return None


def _writable_state(obj):
    state = working_copy(obj)
    if state is not None:
        if committing_threads and current_thread_key() in committing_threads:
            refuse_late_change(obj)
        return state
    if _get_init(obj) == _get_ident() and _get_oid(obj) is None:
        return _get_dict(obj)
    raise RuntimeError(_READ_ONLY)


def _replace_state(obj, value):
    """`obj.__dict__ = value`: the calling thread's working copy takes the
    items of `value` (the slot itself holds the state every thread shares,
    and no commit would have stored what was put there)."""
    if not isinstance(value, dict):
        raise InvalidTypeError("__dict__ must be set to a dictionary, not a '%s'"
                               % type(value).__name__)
    state = _writable_state(obj)
    items = dict(value)  # before clearing: `value` may be the state itself
    state.clear()
    state.update(items)


def _refuse_class_name(obj, name):
    """Refuse to set `name`, which `dunders_of` reads from the class, unless
    it is a data descriptor (``__class__``, a property): a value stored
    under it would never be read back."""
    if name == "__class__" and _get_oid(obj) is not None:
        # It would change at once in every thread, and no commit stores it.
        raise AttributeError("the class of stored object %s can't be changed: store a new "
                             "object of the other class instead" % named(obj))
    if not is_data_descriptor(class_attribute(type(obj), name)):
        raise AttributeError("%s is read from the class %s, not from the state: it can't be "
                             "set on an instance" % (name, type(obj).__name__))


def refuse_late_change(obj):
    """Raise DobbinError: the calling thread's commit has stored its states
    already (another data manager's phase of the two-phase commit runs),
    so a change to `obj` now would be shown to every thread, unstored."""
    raise DobbinError("%s can't be changed or checked out now: this thread's transaction is "
                      "committing and has written its objects; change it before "
                      "transaction.commit() or after it returns" % named(obj))


def _wrap_init(init):
    # Attributes set while __init__ runs go straight to the new object's
    # state; afterwards the object is read-only like any other.
    @functools.wraps(init)
    def __init__(self, /, *args, **kwargs):
        outer = _get_init(self)
        _set_init(self, _get_ident())
        try:
            init(self, *args, **kwargs)
        finally:
            _set_init(self, outer)

    __init__._p_wrapped = True
    return __init__


def _check_init(cls):
    """Wrap the __init__ `cls` resolves to, unless it is wrapped already:
    its own, one inherited from a base that is not persistent (a mixin),
    or one a class decorator such as @dataclass added after creation."""
    init = cls.__init__
    if init is not object.__init__ and not getattr(init, "_p_wrapped", False):
        cls.__init__ = _wrap_init(init)


@implementer(IPersistent)
class Persistent:
    """Base class of objects stored in a Dobbin database."""

    __slots__ = ("_p_oid", "_p_jar", "_p_serial", "_p_ghost", "_p_local", "_p_init",
                 "_p_size", "__dict__", "__weakref__")

    # The class whose __init__ was last checked at instantiation (__new__):
    # a class decorator (@dataclass) may replace it after __init_subclass__.
    # An __init__ assigned to a class after its first instance is not wrapped.
    _p_init_checked = None

    # Why the class is a stand-in for one that could not be imported
    # (dobbin.broken), or None.
    _p_broken = None

    def __new__(cls, *args, **kwargs):
        if cls._p_init_checked is not cls:  # an inherited mark is the base's
            _check_init(cls)
            cls._p_init_checked = cls
        return _new_instance(cls, None, None, False)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        slots = cls.__dict__.get("__slots__", ())
        if slots:
            # A slot lives on the shared instance: it could be neither a
            # thread's private copy nor part of the stored state.
            raise InvalidTypeError("persistent class %s may not declare __slots__ (%r): its "
                                   "attributes must live in its state" % (cls.__name__, slots))
        for name in ("__getstate__", "__setstate__"):
            owner = next((klass for klass in cls.__mro__
                          if klass is not object and name in vars(klass)), None)
            if owner is not None:
                # It would be ignored: a state is the instance dict, stored
                # and loaded as it is (and shared by every thread).
                raise InvalidTypeError("persistent class %s may not have %s (from %s): its state "
                                       "is its instance dict, stored and loaded as it is"
                                       % (cls.__name__, name, owner.__name__))
        _check_init(cls)  # checked again when first instantiated, see __new__

    def __getattribute__(self, name):
        if name[0] == "_" and (name[:3] == "_p_" or name[:2] == "__" and name in (
                class_dunders.get(type(self)) or dunders_of(type(self)))):
            if name == "__dict__":  # vars(obj), dir(obj): what attribute reads show
                return state_of(self)
            return _object_getattribute(self, name)
        table = _get_local(self)
        if table:
            state = table.get(getattr(_threads, "key", None))  # current_thread_key(), inlined
            if state is not None:
                names = descriptor_names.get(type(self)) or data_descriptor_names(type(self))
                if name not in names:
                    if name in state:
                        return state[name]
                    if name not in _get_dict(self):
                        # Not an attribute of ours at all (a method, a class
                        # attribute): the ordinary lookup is right, and fast.
                        return _object_getattribute(self, name)
                return _lookup(self, state, name)
        if _get_ghost(self):
            _get_jar(self)._p_activate(self)
        # The cache may evict the state while we read it (ghost flag first,
        # then an empty dict): then the value came from the class, maybe
        # for want of the instance's.  The state, loaded again, says.
        # Reading again instead would run a property again, and one that
        # reads more than the cache holds evicts its object every time.
        try:
            value = _object_getattribute(self, name)
        except AttributeError:
            found = _instance_value(self, name) if _get_ghost(self) else MISSING
            if found is MISSING:
                raise
            return found
        if _get_ghost(self):
            found = _instance_value(self, name)
            if found is not MISSING:
                return found
        return value

    def __setattr__(self, name, value):
        if name[:1] == "_":  # one character: no new string
            if name[:2] == "__":
                if name == "__dict__":
                    return _replace_state(self, value)
                if name in dunders_of(type(self)):
                    _refuse_class_name(self, name)
            elif name[:3] == "_p_":
                if name in _SLOTS:
                    # Another oid: records the next open calls corrupt;
                    # another jar: a reference to whatever object has the
                    # same oid there; and so on.
                    raise AttributeError("%s is set by the database only" % name)
                if name == "_p_changed":
                    # ZODB's way to save a change made in place.  A
                    # checked-out object is stored whole anyway; any other
                    # must be checked out first (before the change, which
                    # was made to the state every thread shares).
                    if working_copy(self) is None:
                        raise RuntimeError("%s: check the object out (dobbin.persistent."
                                           "checkout) before changing it; a checked-out object "
                                           "is stored whole, with no _p_changed" % _READ_ONLY)
                    return None
                # Any other _p_ name would go into the state that every
                # thread shares, with no checkout, and be stored as data.
                raise AttributeError("%s is not an attribute a program may set (_p_ names "
                                     "are the database's)" % name)
        # _writable_state(), inlined: every attribute an __init__ sets comes here.
        table = _get_local(self)
        if table:
            key = getattr(_threads, "key", None)
            state = table.get(key)
            if state is not None and committing_threads and key in committing_threads:
                refuse_late_change(self)
        else:
            state = None
        if state is None:
            if _get_init(self) != _get_ident() or _get_oid(self) is not None:
                raise RuntimeError(_READ_ONLY)
            state = _get_dict(self)  # a new object in its __init__
        names = descriptor_names.get(type(self)) or data_descriptor_names(type(self))
        if name in names:
            attribute = class_attribute(type(self), name)
            setter = getattr(type(attribute), "__set__", None)
            if setter is not None:
                setter(attribute, self, value)
                return
        state[name] = value

    def __delattr__(self, name):
        if name[:3] == "_p_":
            raise AttributeError("can't delete %s" % name)
        if name[:2] == "__" and name in dunders_of(type(self)):
            _refuse_class_name(self, name)
        state = _writable_state(self)
        attribute = class_attribute(type(self), name)
        if attribute is not MISSING and hasattr(type(attribute), "__delete__"):
            type(attribute).__delete__(attribute, self)
            return
        try:
            del state[name]
        except KeyError:
            raise AttributeError(name) from None

    def __deepcopy__(self, memo):
        # Checkouts copy states deeply, but references to other persistent
        # objects must keep their identity.
        if isinstance(memo, KeepPersistent):
            return self
        # Anyone else's copy would have been the object itself, silently:
        # "clone a template, change the clone" changed the template.
        raise InvalidTypeError("a persistent object is not copied by copy.deepcopy (the copy "
                               "would be the same object): make a new %s" % type(self).__name__)

    def __copy__(self):
        raise InvalidTypeError("a persistent object is not copied by copy.copy: make a new %s"
                               % type(self).__name__)

    def __reduce__(self):
        raise InvalidTypeError("persistent objects are stored by the database, not pickled "
                               "directly")


# The _p_ slots: Dobbin's code sets them through their setters (below).
_SLOTS = frozenset(name for name in Persistent.__slots__ if name[:3] == "_p_")

# The slots' own getters and setters: much cheaper than object's generic
# getattr and setattr, which look the name up first.
_get_oid = Persistent._p_oid.__get__
_get_jar = Persistent._p_jar.__get__
_get_ghost = Persistent._p_ghost.__get__
_get_serial = Persistent._p_serial.__get__
_get_local = Persistent._p_local.__get__
_get_init = Persistent._p_init.__get__
_get_dict = Persistent.__dict__["__dict__"].__get__
_set_oid = Persistent._p_oid.__set__
_set_jar = Persistent._p_jar.__set__
_set_serial = Persistent._p_serial.__set__
_set_ghost = Persistent._p_ghost.__set__
_set_local = Persistent._p_local.__set__
_set_init = Persistent._p_init.__set__
_set_size = Persistent._p_size.__set__


def _new_instance(cls, oid, jar, ghost):
    obj = object.__new__(cls)
    _set_oid(obj, oid)
    _set_jar(obj, jar)
    _set_serial(obj, 0)
    _set_ghost(obj, ghost)
    _set_local(obj, None)
    _set_init(obj, None)
    _set_size(obj, 0)
    return obj


def install_state(obj, state, serial, size):
    """Make `state` the committed state of `obj` (for its database only)."""
    # Replace, never mutate: readers in other threads see the old dict or
    # the new one, and checkouts keep the old one as `old`.
    _object_setattr(obj, "__dict__", state)
    _set_serial(obj, serial)
    _set_size(obj, size)
    _set_ghost(obj, False)


def new_ghost(cls, oid, jar):
    """An object of `cls` whose state `jar` loads on first access.

    Its class's ``__new__`` and ``__init__`` are not called: the object
    was built once already, when it was first created.
    """
    if not (isinstance(cls, type) and issubclass(cls, Persistent)):
        raise InvalidTypeError("%r is not a persistent class" % (cls,))
    return _new_instance(cls, oid, jar, True)


def ghost_oid(obj, jar):
    """The oid of `obj` if it is a ghost of `jar`, else None (also for
    values that are not persistent objects)."""
    if isinstance(obj, Persistent) and _get_ghost(obj) and _get_jar(obj) is jar:
        return _get_oid(obj)
    return None


def _lookup(obj, state, name):
    """Attribute lookup with `state` standing in for the instance dict."""
    cls = type(obj)
    attribute = class_attribute(cls, name)
    if name in data_descriptor_names(cls):
        return type(attribute).__get__(attribute, obj, cls)
    try:
        return state[name]
    except KeyError:
        pass
    if attribute is not MISSING:
        getter = getattr(type(attribute), "__get__", None)
        return attribute if getter is None else getter(attribute, obj, cls)
    fallback = class_attribute(cls, "__getattr__")
    if fallback is not MISSING:
        return fallback(obj, name)
    raise AttributeError("%r object has no attribute %r" % (cls.__name__, name))


def _instance_value(obj, name):
    """`name` in the state of `obj`, evicted while it was read, loaded
    again; MISSING if the class answers for it (see __getattribute__)."""
    state = committed_state(obj)
    if name in state and name not in data_descriptor_names(type(obj)):
        return state[name]
    return MISSING


def checkout(obj):
    """Give the calling thread a private, writable copy of `obj`.

    The copy lasts until the thread's transaction ends (commit or abort);
    checking out twice in one transaction does nothing.  Returns None:
    the object's identity never changes.  ReadOnlyError if the object's
    database is closed: its commit could not be.
    """
    if not isinstance(obj, Persistent):
        raise InvalidTypeError("only persistent objects can be checked out, not %r"
                               % type(obj).__name__)
    if type(obj)._p_broken is not None:
        raise BrokenObjectError("%s.%s oid %s can't be checked out: its class could not be "
                                "imported (%s); restore the class under that name, and reopen"
                                % (type(obj).__module__, type(obj).__qualname__, obj._p_oid,
                                   type(obj)._p_broken))
    ident = thread_key()
    if committing_threads and ident in committing_threads:
        refuse_late_change(obj)
    table = _get_local(obj)
    if table and ident in table:
        return
    session = current_session()
    jar = _get_jar(obj)
    if jar is None:
        _take_working_copy(obj, ident, session)
        return
    if jar.closed:
        raise ReadOnlyError("%s is closed" % jar.path)
    jar._p_register_thread()
    # Under the database's state lock, which eviction takes too: once our
    # copy is in the table the object can't be evicted, and until then it
    # can't be emptied between loading and copying.
    with jar._state_lock:
        if _get_ghost(obj):
            jar._p_activate(obj)
        _take_working_copy(obj, ident, session)


def _take_working_copy(obj, ident, session):
    # Serial first, then state: a racing publish (state, then serial) can
    # only make us see a conflict that isn't one, never miss one.
    serial = _get_serial(obj)
    shared = _get_dict(obj)
    working = copy_state(shared)
    table = _get_local(obj)
    if table is None:
        with _local_table_lock:
            table = _get_local(obj)
            if table is None:
                table = {}
                _object_setattr(obj, "_p_local", table)
    table[ident] = working
    session.add(obj, shared, serial)


def state_of(obj):
    """The state `obj` shows the calling thread, as one dict.

    Its working copy if the thread has `obj` checked out (which it may
    change), else the shared committed state (which it must not).  One
    dict is one consistent state: a commit replaces states whole.  For
    code that reads many attributes of one object, such as containers.
    """
    try:
        table = _get_local(obj)
    except (AttributeError, TypeError):
        raise InvalidTypeError("%r is not a persistent object" % (obj,)) from None
    if table:
        state = table.get(getattr(_threads, "key", None))
        if state is not None:
            return state
    if not _get_ghost(obj):
        state = _get_dict(obj)
        if not _get_ghost(obj):
            return state  # not evicted while we took it
    return committed_state(obj)


def committed_state(obj):
    """The state `obj` shows threads that have not checked it out (which
    they must not change): loaded first if a ghost."""
    while True:
        if _get_ghost(obj):
            _get_jar(obj)._p_activate(obj)
        state = _get_dict(obj)
        if not _get_ghost(obj):
            return state  # not evicted while we took it


def checked_out(obj):
    """True when the calling thread has `obj` checked out."""
    return working_copy(obj) is not None


@implementer(IPersistentDict)
class PersistentDict(Persistent):
    """A persistent mapping; items and attributes are independent.

    It behaves like `dict`; every mutation needs a checkout.
    """

    def __init__(self, /, *args, **kwargs):  # positional-only: dict(self=1) works
        self._data = dict(*args, **kwargs)

    def _items_for_writing(self):
        return _writable_state(self)["_data"]

    # -- reading -------------------------------------------------------

    def __getitem__(self, key):
        return self._data[key]

    def __contains__(self, key):
        return key in self._data

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __eq__(self, other):
        if isinstance(other, PersistentDict):
            other = other._data
        return self._data == other

    __hash__ = None

    def __repr__(self):
        return "%s(%r)" % (type(self).__name__, self._data)

    def get(self, key, default=None):
        return self._data.get(key, default)

    # Views of the mapping, not of the dict it holds now: a checkout or a
    # commit replaces that dict, and a view must go on showing the items.
    def keys(self):
        return KeysView(self)

    def values(self):
        return _Values(self)

    def items(self):
        return _Items(self)

    def copy(self):
        """A plain dict with the same items."""
        return dict(self._data)

    def __reversed__(self):
        return reversed(self._data)

    def __or__(self, other):
        if isinstance(other, PersistentDict):
            other = other._data
        if not isinstance(other, dict):
            return NotImplemented
        return self._data | other

    def __ror__(self, other):
        if not isinstance(other, dict):
            return NotImplemented
        return other | self._data

    @classmethod
    def fromkeys(cls, iterable, value=None):
        return cls(dict.fromkeys(iterable, value))

    # -- writing (checkout required) -------------------------------------

    def __setitem__(self, key, value):
        self._items_for_writing()[key] = value

    def __delitem__(self, key):
        del self._items_for_writing()[key]

    def clear(self):
        self._items_for_writing().clear()

    def pop(self, key, *default):
        return self._items_for_writing().pop(key, *default)

    def popitem(self):
        return self._items_for_writing().popitem()

    def setdefault(self, key, default=None):
        return self._items_for_writing().setdefault(key, default)

    def update(self, /, *args, **kwargs):
        self._items_for_writing().update(*args, **kwargs)

    def __ior__(self, other):
        if isinstance(other, PersistentDict):
            other = other._data
        self._items_for_writing().update(other)
        return self


MutableMapping.register(PersistentDict)


class _Items(ItemsView):
    """A PersistentDict's items, iterated from the dict it holds then."""

    __slots__ = ()

    def __iter__(self):
        return iter(self._mapping._data.items())


class _Values(ValuesView):
    """A PersistentDict's values, iterated from the dict it holds then."""

    __slots__ = ()

    def __iter__(self):
        return iter(self._mapping._data.values())
