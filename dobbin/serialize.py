"""Object state <-> bytes.

A record is the pickle of `(class, state)`, written by a fresh pickler
so that no memo is shared between records (each record loads on its
own).  References to other persistent objects and to streams are not
pickled: the `persistent_id` hook of the caller turns them into small
ids, and `persistent_load` turns the ids back into live objects.
"""

import io
import pickle
import sys
from sys import intern

from dobbin.exc import DobbinError, LoadError

PROTOCOL = 5



# Values of these types are never persistent references; the pickler
# asks about every value, so answering them first saves most of the work.
PLAIN_TYPES = frozenset((str, bytes, int, float, bool, type(None), list, dict, tuple, set,
                         frozenset, complex, bytearray, type))


class StateWriter:
    """Pickles `(cls, state)` records, each on its own.

    One pickler serves a whole commit (building one per record costs more
    than the record), and its memo is cleared between records so that no
    record depends on another.  `persistent_id(obj)` returns an id or None.
    """

    def __init__(self, persistent_id):
        self._buffer = io.BytesIO()
        self._pickler = pickle.Pickler(self._buffer, PROTOCOL)
        self._pickler.persistent_id = persistent_id

    def dump(self, cls, state):
        buffer = self._buffer
        buffer.seek(0)
        buffer.truncate()
        self._pickler.clear_memo()
        self._pickler.dump((cls, state))
        return buffer.getvalue()


class _StateUnpickler(pickle.Unpickler):
    """An unpickler that finds a record's class without the import system.

    Every record names its class, and `pickle` resolves each through
    `__import__` (half the cost of loading a small state).  A module
    already imported is asked directly; anything else takes the usual way.
    """

    def find_class(self, module, name):
        loaded = _modules.get(module)
        if loaded is not None and "." not in name:
            found = getattr(loaded, name, _MISSING)
            if found is not _MISSING:
                return found
        return super().find_class(module, name)


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
    if not isinstance(cls, type) or not isinstance(state, dict):
        raise LoadError("the record %s is not a (class, state) pair" % (where % where_args))
    # Attribute names are interned, as Python does for names in code: a
    # million loaded states then share their key strings.
    return cls, {(intern(name) if type(name) is str else name): value
                 for name, value in state.items()}
