"""Stand-ins for classes that can no longer be imported.

A record names its class, and the classes of the values and references
in its state, by module and name.  Code changes: a class is renamed, a
module removed, a plug-in uninstalled.  Failing to load every record
that names such a class would lose far more than its objects: the
records that refer to one (the root, say) could not load either, and
with them the whole database.  So loading puts a stand-in class of the
same module and name in its place, and logs a warning once:

- a persistent object of a missing class loads as an instance of a
  `BrokenPersistent` stand-in.  Its state reads as it was stored, but it
  cannot be checked out: it is never stored again without its class;
- a value of a missing class (inside some state) loads as a `Broken`
  instance keeping what its record held: its constructor arguments, its
  state and its items.  Stored again (when the object holding it is),
  it writes them back unchanged.

Stored again, a stand-in class is written as a call of `find_global`,
which imports the real class when there is one.  Restoring the class
under its old module and name (an alias such as ``OldName = NewName`` is
enough) and reopening the database brings every object back.
"""

import copyreg
import importlib
import logging

from zope.interface import implementer

from dobbin.exc import BrokenObjectError, InvalidTypeError
from dobbin.interfaces import IBroken
from dobbin.persistent import Persistent

logger = logging.getLogger("dobbin")


class BrokenClass(type):
    """The type of every stand-in class."""


def _reduce_stand_in(cls):
    # A stand-in can't be pickled by name (its module doesn't have it):
    # the call finds the real class again once there is one.
    return find_global, (cls.__module__, cls.__qualname__)


# Pickle asks copyreg before pickling a class by name.
copyreg.pickle(BrokenClass, _reduce_stand_in)


@implementer(IBroken)
class Broken:
    """A value whose class could not be imported (see the module docstring)."""

    _p_broken = "not a stand-in"  # the reason, set on each stand-in class

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        held = object.__getattribute__(self, "__dict__")
        # How unpickling made it (a class called, or its __new__ alone)
        # decides how it is written back.
        held.update(_broken_args=args, _broken_kwargs=kwargs, _broken_called=False,
                    _broken_state=None, _broken_list=[], _broken_dict={})
        return self

    def __init__(self, *args, **kwargs):
        object.__getattribute__(self, "__dict__")["_broken_called"] = True

    def __setstate__(self, state):
        object.__getattribute__(self, "__dict__")["_broken_state"] = state

    # What unpickling a list or dict subclass calls with its items.
    def append(self, item):
        self._broken_list.append(item)

    def extend(self, items):
        self._broken_list.extend(items)

    def __setitem__(self, key, value):
        self._broken_dict[key] = value

    def __getattr__(self, name):
        # Only for names not found otherwise: the stored attributes.
        state = object.__getattribute__(self, "_broken_state")
        # A class with __slots__ has a (dict, slots) pair of states.
        for part in state if isinstance(state, tuple) and len(state) == 2 else (state,):
            if isinstance(part, dict) and name in part:
                return part[name]
        raise AttributeError("%s has no attribute %r (its class could not be imported: %s)"
                             % (_class_name(type(self)), name, type(self)._p_broken))

    def __setattr__(self, name, value):
        self.__delattr__(name)

    def __delattr__(self, name):
        raise BrokenObjectError("%s can't be changed: its class could not be imported (%s)"
                                % (_class_name(type(self)), type(self)._p_broken))

    def __reduce_ex__(self, protocol):
        held = object.__getattribute__(self, "__dict__")
        cls = type(self)
        args, kwargs = held["_broken_args"], held["_broken_kwargs"]
        if held["_broken_called"]:
            constructor, arguments = cls, args  # a class called: kwargs can't be
        elif kwargs:
            constructor, arguments = copyreg.__newobj_ex__, (cls, args, kwargs)
        else:
            constructor, arguments = copyreg.__newobj__, (cls,) + args
        items, entries = held["_broken_list"], held["_broken_dict"]
        return (constructor, arguments, held["_broken_state"],
                iter(items) if items else None, iter(entries.items()) if entries else None)

    def __repr__(self):
        return "<broken %s instance>" % _class_name(type(self))


@implementer(IBroken)
class BrokenPersistent(Persistent):
    """A persistent object whose class could not be imported: readable as
    stored, never checked out (see the module docstring)."""

    _p_broken = "not a stand-in"

    def __new__(cls, *args, **kwargs):
        # Its objects come from records only (as ghosts, made without it).
        raise InvalidTypeError("%s is a stand-in for a class that could not be imported (%s): "
                               "it makes no new objects" % (_class_name(cls), cls._p_broken))


def _class_name(cls):
    return "%s.%s" % (cls.__module__, cls.__qualname__)


_stand_ins = {}  # (module, name, persistent) -> stand-in class


def stand_in(module, name, reason, persistent=False):
    """The stand-in class for `module.name`, which could not be imported
    for `reason`: for persistent objects, or for other values."""
    key = (module, name, persistent)
    found = _stand_ins.get(key)
    if found is None:
        if not any(known[:2] == (module, name) for known in _stand_ins):
            logger.warning("class %s.%s could not be imported (%s): its objects load as "
                           "broken stand-ins, readable but not changeable; restore it under "
                           "that name to change them", module, name, reason)
        base = BrokenPersistent if persistent else Broken
        made = BrokenClass(name.rpartition(".")[2], (base,),
                           {"__module__": module, "__qualname__": name, "_p_broken": reason})
        found = _stand_ins.setdefault(key, made)  # another thread's if it was first
    return found


def persistent_stand_in(cls):
    """`cls` itself, or the persistent stand-in of the same name for a
    value stand-in: a record or a reference names a class without saying
    which kind it is until it is used."""
    if type(cls) is BrokenClass and not issubclass(cls, Persistent):
        return stand_in(cls.__module__, cls.__qualname__, cls._p_broken, persistent=True)
    return cls


def find_global(module, name):
    """The class `module.name` (a dotted name for a nested class), or its
    stand-in when it can't be imported."""
    try:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        return stand_in(module, name, "%s: %s" % (type(error).__name__, error))
    return found
