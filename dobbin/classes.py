"""What Dobbin learns about a persistent class, once per class.

Attribute access on a persistent object decides, name by name, whether
the class or the instance state answers: data descriptors (properties)
and the class's own dunders win over the state.  Working that out walks
the MRO, so each answer is computed once per class and kept.
"""

# A value no attribute can have: "the class does not define it".
MISSING = object()


def class_attribute(cls, name):
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return MISSING


descriptor_names = {}


def data_descriptor_names(cls):
    """Names of a class's data descriptors (properties, slots...).

    They take precedence over the instance state.  Computed once per
    class: a data descriptor added to a class after its instances were
    first used is not seen.
    """
    names = descriptor_names.get(cls)
    if names is None:
        names = frozenset(name for klass in cls.__mro__ for name, value in vars(klass).items()
                          if is_data_descriptor(value))
        descriptor_names[cls] = names
    return names


class_dunders = {}

# What Python keeps on a class about the class: never an instance's.
CLASS_METADATA = frozenset((
    "__module__", "__qualname__", "__doc__", "__slots__", "__annotations__", "__hash__",
    "__abstractmethods__", "__orig_bases__", "__parameters__", "__match_args__",
    "__dataclass_fields__", "__dataclass_params__", "__firstlineno__",
    "__static_attributes__", "__type_params__", "__weakrefoffset__"))


def dunders_of(cls):
    """The dunder names a class or a base defines as behaviour or as
    metadata: descriptors (``__class__``, ``__dict__``, methods) and
    `CLASS_METADATA` (``__doc__``, ``__module__``...).

    They are read from the class alone: reading one must neither load a
    ghost nor look for a checkout (isinstance reads ``__class__``), and
    setting one is refused.  A dunder name with a plain class-level value
    (Zope's ``__parent__ = None``) is a default, like any attribute's:
    the state's value wins.  Computed once per class.
    """
    names = class_dunders.get(cls)
    if names is None:
        names = frozenset(name for klass in cls.__mro__ for name, value in vars(klass).items()
                          if name[:2] == "__" and name[-2:] == "__"
                          and (name in CLASS_METADATA or hasattr(type(value), "__get__")))
        class_dunders[cls] = names
    return names


def is_data_descriptor(attribute):
    kind = type(attribute)
    return hasattr(kind, "__set__") or hasattr(kind, "__delete__")
