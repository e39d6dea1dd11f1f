"""Object state <-> bytes.

A record is the pickle of `(class, state)`, written by a fresh pickler
so that no memo is shared between records (each record loads on its
own).  References to other persistent objects and to streams are not
pickled: the caller's `reference_id` hook turns them into small ids,
stored as calls of `reference(*id)`, and the loader's `persistent_load`
turns the ids back into live objects.

Why calls and not pickle's own persistent ids: the pickler asks its
`persistent_id` hook about every value, strings and ints included,
while `reducer_override` only hears of objects of other classes, so
saving a small state costs a fraction of the Python calls.  Records
with persistent ids (written by earlier versions) load all the same.
"""

import io
import pickle
import sys
import types
from sys import intern

from dobbin.broken import BrokenClass, persistent_stand_in, stand_in
from dobbin.exc import DobbinError, LoadError, UnstorableError

PROTOCOL = 5

# A record longer than this gets the next one a new pickler: clearing a
# memo costs the size its table grew to, and the table never shrinks (one
# 900,000-string state made every later small commit 45 times slower).
RENEW_AFTER = 8 * 1024


# Values of these types are never persistent references: a hook asked
# about them answers first.
PLAIN_TYPES = frozenset((str, bytes, int, float, bool, type(None), list, dict, tuple, set,
                         frozenset, complex, bytearray, type, types.FunctionType))


def reference(*pid):
    """How a record names a persistent object or a stream: ``reference(*id)``.

    A database's loader resolves the call to the live object; plain
    `pickle` (a tool reading a record) gets the id tuple back.
    """
    return pid


class _StatePickler(pickle.Pickler):
    def __init__(self, file, reference_id):
        super().__init__(file, PROTOCOL)
        self.reference_id = reference_id

    def reducer_override(self, obj):
        pid = self.reference_id(obj)
        if pid is None:
            return NotImplemented
        return reference, tuple(pid)


class StateWriter:
    """Pickles `(cls, state)` records, each on its own.

    One pickler serves a whole commit (building one per record costs more
    than the record), and its memo is cleared between records so that no
    record depends on another.  `reference_id(obj)` returns the id (a
    tuple) of a persistent reference, or None for a value to pickle.
    """

    def __init__(self, reference_id):
        self._renew(reference_id)

    def _renew(self, reference_id):
        self._buffer = io.BytesIO()
        self._pickler = _StatePickler(self._buffer, reference_id)

    @property
    def reference_id(self):
        """The hook asked about each non-builtin value (settable, so that
        one writer can serve commit after commit)."""
        return self._pickler.reference_id

    @reference_id.setter
    def reference_id(self, hook):
        self._pickler.reference_id = hook

    def dump(self, cls, state):
        buffer = self._buffer
        buffer.seek(0)
        buffer.truncate()
        self._pickler.clear_memo()
        try:
            self._pickler.dump((cls, state))
        except DobbinError:
            self._renew(self._pickler.reference_id)  # its memo may have grown all the same
            raise  # from the reference hook: already says what is wrong
        except Exception as error:  # pickle's own, or raised by a value's __reduce__
            self._renew(self._pickler.reference_id)
            raise UnstorableError("cannot store a %s: %s: %s"
                                  % (cls.__name__, type(error).__name__, error)) from error
        data = buffer.getvalue()
        if len(data) > RENEW_AFTER:
            self._renew(self._pickler.reference_id)  # the buffer's room goes too
        return data


class _StateUnpickler(pickle.Unpickler):
    """An unpickler that resolves `reference` calls through its
    `persistent_load`, and finds a record's class without the import system.

    Every record names its class, and `pickle` resolves each through
    `__import__` (half the cost of loading a small state).  A module
    already imported is asked directly; anything else takes the usual way.
    """

    def find_class(self, module, name):
        if name == "reference" and module == __name__:
            # Not a method of ours: the unpickler's memo keeps what this
            # returns, and a cycle through it would leave every loaded
            # record's unpickler (memo and all) to the cyclic collector.
            persistent_load = self.persistent_load
            return lambda *pid: persistent_load(pid)
        loaded = _modules.get(module)
        if loaded is not None and "." not in name:
            found = getattr(loaded, name, _MISSING)
            if found is not _MISSING:
                return found
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as error:
            # Gone from the code: see dobbin.broken.
            return stand_in(module, name, "%s: %s" % (type(error).__name__, error))


_modules = sys.modules
_MISSING = object()


def load_state(data, persistent_load, where="", *where_args):
    """Unpickle a record into `(cls, state)`.

    Any failure (a class that was renamed, a module that is gone) is
    reported as `LoadError` naming the record (``where % where_args``,
    formatted only then).
    """
    unpickler = _StateUnpickler(io.BytesIO(data))
    unpickler.persistent_load = persistent_load
    try:
        cls, state = unpickler.load()
    except DobbinError:
        raise
    except Exception as error:
        raise LoadError("cannot load the record %s: %s: %s"
                        % (where % where_args, type(error).__name__, error)) from error
    if type(cls) is BrokenClass:
        cls = persistent_stand_in(cls)  # a record's class is a persistent one
    if not isinstance(cls, type) or not isinstance(state, dict):
        raise LoadError("the record %s is not a (class, state) pair" % (where % where_args))
    # Attribute names are interned, as Python does for names in code: a
    # million loaded states then share their key strings.
    return cls, {(intern(name) if type(name) is str else name): value
                 for name, value in state.items()}
