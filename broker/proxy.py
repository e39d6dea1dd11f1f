"""Client-side stand-ins for server objects.

A Proxy forwards everything to its BrokerClient, which keeps the state,
the local changes and the lock; the proxy only holds what identifies it.
Attribute names starting with "_" belong to the proxy itself and never
reach the server.
"""

from zope.interface import implementer

from broker.exc import InvalidTypeError, InvalidValueError
from broker.interfaces import IProxy, IRemoteStream
from dobbin.stream import seek_position

STREAM_CHUNK = 256 * 1024


@implementer(IProxy)
class Proxy:
    """The proxy of one server object, as of the client's snapshot.

    Reading an attribute loads the object's state once per transaction;
    setting or deleting one is recorded locally until client.commit().
    Exported methods are called remotely.  Mapping objects (PersistentDict,
    B-trees) also support item access, `in`, len() and iteration, and their
    proxies become MappingProxy with keys(), values(), items() and get().
    """

    __slots__ = ("_key", "_client", "_state", "_class", "_items", "_all", "__weakref__")

    def __init__(self, client, key, class_name=None):
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_state", None)
        object.__setattr__(self, "_class", class_name)
        object.__setattr__(self, "_items", None)
        object.__setattr__(self, "_all", None)

    def _ghostify(self):
        """Forget the loaded state (called by the client on invalidation)."""
        object.__setattr__(self, "_state", None)
        object.__setattr__(self, "_items", None)
        object.__setattr__(self, "_all", None)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._client._read_attr(self, name)

    def __setattr__(self, name, value):
        if name.startswith("_"):
            raise AttributeError("cannot set private attribute %r on a proxy" % name)
        self._client._write_attr(self, name, value)

    def __delattr__(self, name):
        if name.startswith("_"):
            raise AttributeError("cannot delete private attribute %r on a proxy" % name)
        self._client._delete_attr(self, name)

    def __repr__(self):
        return "<Proxy %s %s>" % (self._class or "?", self._key)

    def __bool__(self):
        if self._client._is_mapping(self):
            return len(self) > 0
        return True

    # -- the mapping protocol (TypeError for objects that are not mappings) --

    def __getitem__(self, item):
        return self._client._get_item(self, item)

    def __setitem__(self, item, value):
        self._client._set_item(self, item, value)

    def __delitem__(self, item):
        self._client._delete_item(self, item)

    def __contains__(self, item):
        return self._client._has_item(self, item)

    def __len__(self):
        return len(self._client._listing(self))

    def __iter__(self):
        return iter([k for k, _v in self._client._listing(self)])


class MappingProxy(Proxy):
    """The proxy of a mapping object; the client switches a Proxy to it on load.

    Only mapping proxies have keys(), values(), items() and get(), so that
    attributes of that name on other objects stay reachable.
    """

    __slots__ = ()

    def keys(self):
        """The mapping's keys, as a list (a snapshot)."""
        return [k for k, _v in self._client._listing(self)]

    def values(self):
        """The mapping's values, as a list (a snapshot)."""
        return [v for _k, v in self._client._listing(self)]

    def items(self):
        """The mapping's (key, value) pairs, as a list (a snapshot)."""
        return list(self._client._listing(self))

    def get(self, item, default=None):
        """The value of `item`, or `default` if the mapping has no such item."""
        try:
            return self[item]
        except KeyError:
            return default


class RemoteMethod:
    """An exported method of a server object, bound to its proxy."""

    __slots__ = ("proxy", "name")

    def __init__(self, proxy, name):
        self.proxy = proxy
        self.name = name

    def __call__(self, *args, **kwargs):
        return self.proxy._client._invoke(self.proxy, self.name, args, kwargs)

    def __repr__(self):
        return "<remote method %s of %r>" % (self.name, self.proxy)


@implementer(IRemoteStream)
class RemoteStream:
    """A PersistentStream attribute read through the broker, chunk by chunk.

    File-like (read, seek, tell, close, closed, context manager) and
    iterable (chunks of STREAM_CHUNK bytes, independent of the position).
    Reads use the snapshot of the transaction that read the attribute:
    each read of it gives a stream of its own.
    """

    def __init__(self, client, key, tid=None):
        self._client = client
        self._key = key
        self._tid = tid  # the snapshot read (None: the client's current one)
        self._size = None
        self._position = 0
        self.closed = False

    def __repr__(self):
        return "<RemoteStream %s>" % (self._key,)

    def _fetch(self, offset, size):
        data, total = self._client._read_stream(self._key, offset, size, self._tid)
        self._size = total
        return data

    @property
    def size(self):
        """Total size in bytes."""
        if self._size is None:
            self._fetch(0, 1)
        return self._size

    def _check_open(self):
        if self.closed:
            raise InvalidValueError("I/O operation on a closed stream")

    def readable(self):
        return True

    def seekable(self):
        return True

    def read(self, size=-1):
        self._check_open()
        if size is not None and type(size) is not int:
            raise InvalidTypeError("a read size is an int, not %r" % (size,))
        end = self.size if size is None or size < 0 else min(self.size, self._position + size)
        parts = []
        while self._position < end:
            chunk = self._fetch(self._position, min(STREAM_CHUNK, end - self._position))
            if not chunk:
                break
            parts.append(chunk)
            self._position += len(chunk)
        return b"".join(parts)

    def seek(self, offset, whence=0):
        self._check_open()
        self._position = seek_position(offset, whence, self._position, lambda: self.size)
        return self._position

    def tell(self):
        self._check_open()
        return self._position

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __iter__(self):
        self._check_open()  # here, not at the first next(): a generator starts late
        return self._chunks()

    def _chunks(self):
        offset = 0
        while True:
            self._check_open()
            chunk = self._fetch(offset, STREAM_CHUNK)
            if not chunk:
                return
            offset += len(chunk)
            yield chunk
