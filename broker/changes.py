"""The client transaction's local changes, and the commit message they make.

For every attribute or mapping item the client changes, it keeps the new
value (or DELETED) and the value its snapshot had when it first changed it
(the "old" value, or ABSENT).  The server checks each old value against the
current one before applying anything: that is the verified update.
"""

from broker.codec import ABSENT

_CONTAINERS = frozenset({list, dict, set, tuple, frozenset})


def private_copy(value, memo=None):
    """`value` as handed to the application: its lists, dicts and sets are
    copies (deep, sharing and cycles kept), so that changing one in place
    changes neither the client's cached state nor the old value a commit
    sends; everything else (proxies, streams, str...) is the value itself."""
    t = type(value)
    if t not in _CONTAINERS:
        return value
    if memo is None:
        memo = {}
    done = memo.get(id(value))
    if done is not None:
        return done
    if t is list:
        copy = memo[id(value)] = []  # before its items, which may refer to it
        copy.extend(private_copy(x, memo) for x in value)
    elif t is dict:
        copy = memo[id(value)] = {}
        copy.update((k, private_copy(v, memo)) for k, v in value.items())
    else:
        # Tuples and frozensets too: they may hold lists.  Set members and
        # dict keys are hashable, so nothing in them can change.
        items = [private_copy(x, memo) for x in value]
        # Made while copying its items, if a cycle leads back to it (as
        # copy.deepcopy does): one copy, or the cycle would close elsewhere.
        copy = memo.get(id(value))
        if copy is None:
            copy = memo[id(value)] = t(items)
    return copy


class _Deleted:
    __slots__ = ()

    def __repr__(self):
        return "DELETED"


DELETED = _Deleted()


class LocalChanges:
    """The write set of one client transaction.  The client holds its lock."""

    def __init__(self):
        self.clear()

    def clear(self):
        self.attrs = {}       # token -> {name: value or DELETED}
        self.attr_olds = {}   # token -> {name: old value or ABSENT}
        self.items = {}       # token -> {item: value or DELETED}
        self.item_olds = {}   # token -> {item: old value or ABSENT}
        self.proxies = {}     # token -> proxy
        self.new = {}         # temporary number -> (proxy, class name)

    def __bool__(self):
        return bool(self.attrs or self.items or self.new)

    def changed_proxies(self):
        return list(self.proxies.values())

    def set_attr(self, proxy, name, value, old):
        token = proxy._key.token
        self.proxies[token] = proxy
        self.attrs.setdefault(token, {})[name] = value
        self.attr_olds.setdefault(token, {}).setdefault(name, old)

    def get_attr(self, proxy, name, default):
        return self.attrs.get(proxy._key.token, {}).get(name, default)

    def set_item(self, proxy, item, value, old):
        token = proxy._key.token
        self.proxies[token] = proxy
        self.items.setdefault(token, {})[item] = value
        self.item_olds.setdefault(token, {}).setdefault(item, old)

    def get_item(self, proxy, item, default):
        return self.items.get(proxy._key.token, {}).get(item, default)

    def item_changes(self, proxy):
        return self.items.get(proxy._key.token, {})

    def add_new(self, number, proxy, class_name):
        self.new[number] = (proxy, class_name)
        self.proxies[proxy._key.token] = proxy

    def message(self):
        """Return the commit fields new, set, del, setitem, delitem (protocol.REQUESTS)."""
        new, sets, dels, setitems, delitems = [], [], [], [], []
        for number, (proxy, class_name) in self.new.items():
            fields = {name: value for name, value in self.attrs.get(proxy._key.token, {}).items()
                      if value is not DELETED}
            new.append([number, class_name, fields])
        for token, changes in self.attrs.items():
            if token[0] == "n":
                continue
            key = self.proxies[token]._key
            olds = self.attr_olds[token]
            for name, value in changes.items():
                if value is DELETED:
                    dels.append([key, name, olds[name]])
                else:
                    sets.append([key, name, olds[name], value])
        for token, changes in self.items.items():
            key = self.proxies[token]._key
            olds = self.item_olds[token]
            for item, value in changes.items():
                if value is DELETED:
                    if olds[item] is not ABSENT:
                        delitems.append([key, item, olds[item]])
                else:
                    setitems.append([key, item, olds[item], value])
        return {"new": new, "set": sets, "del": dels, "setitem": setitems, "delitem": delitems}
