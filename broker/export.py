"""What the server lets clients see, change and call.

The rules, per class (looked up along the MRO, so subclasses inherit):

- Without export_class, public attributes (no leading underscore) of
  persistent objects are readable, none is writable, and only methods
  decorated with `exported` are callable.
- export_class(cls, fields=..., refs=..., callables=..., hidden=...,
  readonly=..., creatable=...) narrows what is readable to `fields` + `refs`
  (or keeps every public attribute when fields is None), makes the readable
  ones writable except `readonly` (True: none), and makes `callables` plus
  the decorated methods callable.
- Writable are instance fields only: never a method, property or other
  descriptor, and a name with a class-level value only when `fields` or
  `refs` declares it or the class's own methods store it on objects (the
  value is then a field's default; otherwise it is a setting the server's
  code reads, such as OOBTree.max_bucket_size).  Dobbin's own classes
  (B-trees and their parts, PersistentDict) have no writable attribute, and
  the names they define are never writable in subclasses either.
- A subclass inherits `callables` by name, but a decorated method only
  while its own attribute of that name is still decorated: an override
  without `exported` is not callable.
- `hidden` names are never readable, writable or callable, and are never
  sent, not even their names; for a mapping class they also name the items
  clients can neither see nor set (to them these items are absent).  Where
  clients may set names that do not exist yet (without `fields`, or items
  of a writable mapping), the refusal to set a hidden one tells them that
  it is hidden (never its value); with `fields` declared, a hidden name is
  refused as any undeclared one is.
- Names starting with "_" are never exported, whatever the configuration.
"""

import collections.abc
import dis
import inspect
import types

from zope.interface import implementer

from broker.codec import ABSENT
from broker.exc import ExportError, ProtocolError
from broker.interfaces import IClassExport, IExportRegistry
from dobbin.bucket import Bucket, Length, Node
from dobbin.persistent import Persistent, state_of

_MAPPING_METHODS = ("keys", "items", "values", "__getitem__", "__len__", "__contains__",
                    "__iter__")


def exported(func):
    """Mark a method as callable by clients (root.method(...) on a proxy)."""
    func.__broker_exported__ = True
    return func


def is_exported(func):
    """Return True if `func` was decorated with `exported`."""
    return getattr(func, "__broker_exported__", False) is True


def is_mapping_class(cls):
    """Return True for classes with the Mapping protocol (PersistentDict, B-trees)."""
    if issubclass(cls, collections.abc.Mapping):
        return True
    return all(callable(getattr(cls, name, None)) for name in _MAPPING_METHODS)


def class_name(cls):
    """Return the wire name of a class: "module.QualName"."""
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def _is_dobbins(cls):
    return cls.__module__ == "dobbin" or cls.__module__.startswith("dobbin.")


def _functions(value):
    """The plain functions behind a class attribute (method, property...)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        found = (value.fget, value.fset, value.fdel)
    else:
        found = (value,)
    return [inspect.unwrap(f) for f in found if isinstance(f, types.FunctionType)]


def stored_names(cls):
    """The attribute names that the methods of `cls` (and of its bases but
    Dobbin's own) assign or delete on objects: its instance fields, also
    those that have a class-level default."""
    codes = [func.__code__ for base in cls.__mro__
             if base is not object and not _is_dobbins(base)
             for value in vars(base).values() for func in _functions(value)]
    names = set()
    while codes:
        code = codes.pop()
        names.update(instruction.argval for instruction in dis.get_instructions(code)
                     if instruction.opname in ("STORE_ATTR", "DELETE_ATTR"))
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return frozenset(names)


def _names(value, what):
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split()
    try:
        names = frozenset(value)
    except TypeError:
        raise ExportError("%s is a space-separated str or an iterable of names, not %r"
                          % (what, value)) from None
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ExportError("%s: %r is not an attribute name" % (what, name))
        if name.startswith("_"):
            raise ExportError("%s: private name %r cannot be exported" % (what, name))
    return names


@implementer(IClassExport)
class ClassExport:
    """The export rules of one class; see the module docstring."""

    def __init__(self, cls, fields=None, refs=(), callables=(), hidden=(),
                 readonly=True, creatable=False, extent=None):
        if extent is not None and not callable(extent):
            raise ExportError("extent is a function returning the instances, not %r"
                              % (extent,))
        self.cls = cls
        self.name = class_name(cls)
        self.fields = _names(fields, "fields")
        self.refs = _names(refs, "refs") or frozenset()
        self.hidden = _names(hidden, "hidden") or frozenset()
        decorated = frozenset(
            name for name in dir(cls)
            if not name.startswith("_") and is_exported(getattr(cls, name, None)))
        named = _names(callables, "callables") or frozenset()
        # Kept apart from the decorated ones, which a subclass inherits
        # only while its own attribute is still decorated (ExportRegistry._inherit).
        self.named_callables = named
        self.callables = (named | decorated) - self.hidden
        for name in self.callables:
            if not callable(getattr(cls, name, None)):
                raise ExportError("%s.%s is exported as callable but is not a method"
                                  % (self.name, name))
        if readonly is not True:
            readonly = _names(readonly, "readonly") or frozenset()
        self.readonly = readonly
        if type(creatable) is not bool:
            # creatable="no" would be true, and let clients create them.
            raise ExportError("creatable is True or False, not %r" % (creatable,))
        self.creatable = creatable
        self.extent = extent
        self.mapping = is_mapping_class(cls)
        self._declared = (self.fields or frozenset()) | self.refs
        for name in self._declared:
            if self.behaviour(name):
                raise ExportError("%s.%s is a method or property, not a stored field"
                                  % (self.name, name))
        # The attributes of Dobbin's own classes (B-trees and their parts,
        # PersistentDict) are its internals: clients change items only.
        self._sealed = _is_dobbins(cls) or issubclass(cls, (Bucket, Node, Length))
        self._stored = None  # stored_names(cls), when first needed
        self._unreadable = self.hidden | self.callables
        self._meta = None

    def readable(self, name):
        if name.startswith("_") or name in self.hidden or name in self.callables:
            return False
        return self.fields is None or name in self.fields or name in self.refs

    def writable(self, name):
        if self.readonly is True or name in self.readonly or self._sealed:
            return False
        if not self.readable(name) or self.behaviour(name):
            return False
        defined_by = [base for base in self.cls.__mro__ if name in vars(base)]
        if not defined_by:
            return True  # an instance field
        if any(_is_dobbins(base) for base in defined_by):
            return False  # the database's internals, whatever the export says
        if name in self._declared:
            return True
        # Otherwise a class-level value is a setting the server's code reads
        # (a client's value would replace it for that object), unless the
        # class's methods store the name: then it is a field's default.
        if self._stored is None:
            self._stored = stored_names(self.cls)
        return name in self._stored

    def behaviour(self, name):
        """Whether `name` is a method or property of the class: a value
        stored under it would replace the behaviour for the server's own code."""
        return _behaviour(self.cls, name)

    def callable(self, name):
        return name in self.callables

    def filter_state(self, state):
        # readable(), in line: this runs for every state the server sends.
        unreadable, fields = self._unreadable, self.fields
        result = {k: v for k, v in state.items()
                  if type(k) is str and k[:1] != "_" and k not in unreadable
                  and (fields is None or k in fields or k in self.refs)}
        if self.fields is not None:
            for name in self._declared - self.hidden:
                if name not in result:
                    value = self._default(name)
                    if value is not ABSENT:
                        result[name] = value
        return result

    def _default(self, name):
        """A declared field's class-level default (None is one), or ABSENT."""
        return getattr(self.cls, name, ABSENT)

    def value_seen(self, state, name):
        """The value of `name` that clients see in `state`, as filter_state
        gives it, or ABSENT (also for names they cannot see)."""
        if not self.readable(name):
            return ABSENT
        if name in state:
            return state[name]
        if self.fields is not None:  # declared fields fall back to class defaults
            return self._default(name)
        return ABSENT

    def meta(self):
        """Return the class description sent to clients (no hidden names)."""
        if self._meta is None:
            known = None if self.fields is None else sorted(
                (self.fields | self.refs) - self.hidden)
            if self.readonly is True or self._sealed:
                writable = []
            elif known is None:
                writable = None
            else:
                writable = [n for n in known if self.writable(n)]
            self._meta = {
                "name": self.name,
                "fields": known,
                "writable": writable,
                "callables": sorted(self.callables),
                "readonly": (True if self.readonly is True
                             else sorted(self.readonly - self.hidden)),
                "mapping": self.mapping,
                "items_writable": self.mapping and self.readonly is not True,
                "creatable": self.creatable,
            }
        return self._meta


@implementer(IExportRegistry)
class ExportRegistry:
    """Export rules of every class, with defaults for the rest."""

    def __init__(self):
        self._explicit = {}
        self._options = {}  # export_class options per class, to rebuild its rules
        self._cache = {}
        self._by_name = {}

    def export_class(self, cls, **options):
        if not isinstance(cls, type):
            raise ExportError("export_class needs a class, got %r" % (cls,))
        options.setdefault("readonly", ())
        self._explicit[cls] = ClassExport(cls, **options)
        self._options[cls] = options
        # Rules derived before (a subclass inherits these) are stale now.
        self._cache.clear()
        self._by_name = {}
        for explicit in self._explicit:
            self.lookup(explicit)
        return self._cache[cls]

    def lookup(self, cls):
        rules = self._cache.get(cls)
        if rules is None:
            # Every field an exported base hides stays hidden, whichever
            # base's rules the class follows (or its own).
            hidden = frozenset().union(*(self._explicit[base].hidden for base in cls.__mro__
                                         if base in self._explicit))
            for base in cls.__mro__:
                explicit = self._explicit.get(base)
                if explicit is not None:
                    if base is not cls:
                        rules = self._inherit(cls, explicit, hidden)
                    elif hidden <= explicit.hidden:
                        rules = explicit
                    else:
                        rules = ClassExport(cls, **dict(self._options[cls], hidden=hidden))
                    break
            else:
                rules = ClassExport(cls)
            self._cache[cls] = rules
            self._by_name.setdefault(rules.name, rules)
        return rules

    def by_name(self, name):
        return self._by_name.get(name)

    def explicit_classes(self):
        """The classes configured with export_class (searchable by name)."""
        return frozenset(self._explicit)

    def _inherit(self, cls, parent, hidden):
        # Only the names the parent's export gave; ClassExport finds the
        # decorated methods of `cls` itself, so an undecorated override of
        # a decorated method is not callable.
        named = parent.named_callables

        def stored(names):  # less any that `cls` turned into a method or property
            return names and {n for n in names if not _behaviour(cls, n)}
        return ClassExport(
            cls, fields=stored(parent.fields), refs=stored(parent.refs),
            callables={n for n in named if callable(getattr(cls, n, None))},
            hidden=hidden, readonly=parent.readonly,
            creatable=parent.creatable, extent=parent.extent)


def _behaviour(cls, name):
    attribute = getattr(cls, name, None)
    return callable(attribute) or hasattr(type(attribute), "__get__")


def hidden_item(rules, item):
    """Whether clients may not see (nor change) item `item` of a mapping
    whose class is exported with `rules`: its key is a name it hides."""
    return type(item) is str and item in rules.hidden


def visible_items(rules, mapping):
    """The items of `mapping` clients may see: all but the hidden ones."""
    if not rules.hidden:
        return mapping
    return {k: v for k, v in mapping.items() if not hidden_item(rules, k)}


def live_contents(obj, rules):
    """What a walk of the object graph goes on into from persistent `obj`,
    whose class is exported with `rules`: its readable fields and visible
    items, as they are now."""
    found = [rules.filter_state(state_of(obj))]
    if rules.mapping:
        found.extend(visible_items(rules, obj).values())
    return found


_WALKED = (Persistent, dict, list, tuple, set, frozenset)


def visible_instances(root, cls, exports, limit, contents=live_contents):
    """Yield the stored instances of `cls` that clients can reach from
    `root`: a full walk, through readable fields and visible items only,
    so that an object kept in a hidden or private field stays unfound.
    ProtocolError once it has walked more than `limit` objects.

    `contents(obj, rules)` gives what the walk goes on into from each
    persistent object (the server reads those as of a snapshot instead of
    as they are now: broker.snapshots.Snapshot.contents).
    """
    if root is None:
        return
    walked = 0
    # Containers too, each once: a stored value may hold itself (a client
    # can store a list in a list), and a shared one is walked once.  By
    # id, each kept alive here so that no id is another's meanwhile.
    seen = {}
    stack = [root]
    while stack:
        value = stack.pop()
        if not isinstance(value, _WALKED) or id(value) in seen:
            continue
        seen[id(value)] = value
        if isinstance(value, Persistent):
            walked += 1
            if walked > limit:
                raise ProtocolError("class search walked more than %d objects" % limit)
            if isinstance(value, cls):
                yield value
            stack.extend(contents(value, exports.lookup(type(value))))
        elif isinstance(value, dict):
            stack.extend(value.values())
        else:
            stack.extend(value)
