"""Object keys: a stable identity plus a keyed MAC, and the server secret.

A key names one thing the server exports.  Its `kind` says what:

    "o"  a persistent object, `ident` is its oid (int)
    "s"  a static object registered with add_static, `ident` is its path
         (a tuple of str and int chosen by the application)
    "f"  a persistent stream held in an attribute, `ident` is (oid, field)
    "n"  an object created by the client in the running commit, `ident` is
         the client's temporary number; it has no MAC and is only valid
         inside the commit message that creates it

The MAC is HMAC-SHA256 over a canonical encoding of (kind, ident) under the
server secret, cut to its first 16 bytes (HMAC-SHA256-128).  The secret lives
in a file of mode 0600, by default beside the database file, so every server
on the same database hands out and accepts the same keys, also after a
restart.  Checking uses hmac.compare_digest, in constant time.  A KeyRing
remembers the MACs it computed lately (MEMO_SIZE of them), because the same
objects are named again and again.
"""

import hashlib
import hmac
import os
import stat

import msgpack

from broker.exc import AccessDenied, SecretFileError
from broker.interfaces import IKeyRing
from zope.interface import implementer

MAC_SIZE = 16
SECRET_SIZE = 32
SECRET_SUFFIX = ".broker-secret"
KINDS = frozenset("osfn")
MAX_PATH_PARTS = 16
MAX_PART_LEN = 256
MEMO_SIZE = 65536


class Key:
    """An immutable, hashable object key as carried on the wire.

    Keys compare equal when kind, ident and MAC are equal.  A Key received
    from the network proves nothing until `KeyRing.verify` accepts it.
    """

    __slots__ = ("kind", "ident", "mac", "_hash", "_wire")

    def __init__(self, kind, ident, mac=b""):
        if kind not in KINDS:
            raise AccessDenied("unknown key kind %r" % (kind,))
        check_ident(kind, ident)
        if not isinstance(mac, bytes) or len(mac) not in (0, MAC_SIZE):
            raise AccessDenied("malformed key MAC")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "ident", ident)
        object.__setattr__(self, "mac", mac)
        object.__setattr__(self, "_hash", hash((kind, ident, mac)))
        object.__setattr__(self, "_wire", None)  # the codec's encoding, once made

    def __setattr__(self, name, value):
        raise AttributeError("Key is immutable")

    def __eq__(self, other):
        if not isinstance(other, Key):
            return NotImplemented
        return (self.kind, self.ident, self.mac) == (other.kind, other.ident, other.mac)

    def __hash__(self):
        return self._hash

    @property
    def token(self):
        """(kind, ident): the public part, the name used in broadcasts."""
        return (self.kind, self.ident)

    def __repr__(self):
        return "<Key %s>" % self

    def __str__(self):
        if self.kind == "o":
            return "oid %d" % self.ident
        if self.kind == "s":
            return "static %s" % "/".join(str(p) for p in self.ident)
        if self.kind == "f":
            return "stream oid %d .%s" % self.ident
        return "new object #%d" % self.ident


def check_ident(kind, ident):
    """Raise AccessDenied unless `ident` has the shape `kind` requires."""
    if kind in "on":
        if type(ident) is not int or not 0 <= ident < 2 ** 63:
            raise AccessDenied("malformed key ident for kind %r" % kind)
    elif kind == "s":
        if (type(ident) is not tuple or not 1 <= len(ident) <= MAX_PATH_PARTS
                or not all(_path_part_ok(p) for p in ident)):
            raise AccessDenied("malformed static key path")
    else:
        if (type(ident) is not tuple or len(ident) != 2 or type(ident[0]) is not int
                or not 0 <= ident[0] < 2 ** 63 or type(ident[1]) is not str
                or not 0 < len(ident[1]) <= MAX_PART_LEN):
            raise AccessDenied("malformed stream key")


def _path_part_ok(part):
    if type(part) is int:
        return -2 ** 63 <= part < 2 ** 63
    return type(part) is str and len(part) <= MAX_PART_LEN


def _canonical(kind, ident):
    # msgpack of plain str/int/list is deterministic; it is our MAC input.
    if type(ident) is tuple:
        ident = list(ident)
    return msgpack.packb([kind, ident], use_bin_type=True)


@implementer(IKeyRing)
class KeyRing:
    """Signs and verifies keys under one server secret (bytes, >= 16 long)."""

    def __init__(self, secret):
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise SecretFileError("the broker secret must be at least 16 bytes")
        self._secret = secret
        self._signed = {}   # (kind, ident) -> Key, the latest MEMO_SIZE signed or verified

    def _mac(self, kind, ident):
        return hmac.digest(self._secret, _canonical(kind, ident), hashlib.sha256)[:MAC_SIZE]

    def _key(self, kind, ident):
        # Dict operations are atomic: threads may race here and at worst
        # compute a MAC twice.
        key = self._signed.get((kind, ident))
        if key is None:
            key = Key(kind, ident, self._mac(kind, ident))
            if len(self._signed) >= MEMO_SIZE:
                self._signed.clear()
            self._signed[(kind, ident)] = key
        return key

    def sign(self, kind, ident):
        if kind == "n":
            raise AccessDenied("client-side keys are not signed")
        return self._key(kind, ident)

    def verify(self, key, kinds="osf"):
        if not isinstance(key, Key):
            raise AccessDenied("expected an object key, got %s" % type(key).__name__)
        if key.kind not in kinds:
            raise AccessDenied("a %r key is not allowed here" % key.kind)
        if not hmac.compare_digest(self._key(key.kind, key.ident).mac, key.mac):
            raise AccessDenied("invalid key for %s" % key)
        return key.ident


def secret_path_for(database_path):
    """Return the default secret file path for a database file."""
    return os.fspath(database_path) + SECRET_SUFFIX


def load_or_create_secret(path):
    """Return the secret kept in `path`, creating the file (mode 0600) if missing.

    Several servers may start at once: the file is written under a temporary
    name and linked into place, so a reader never sees a partial secret.
    Raises SecretFileError if it is a symbolic link or not a regular file,
    belongs to another user, is readable by group or others, or is not
    exactly SECRET_SIZE bytes.
    """
    path = os.fspath(path)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    temp = "%s.%d.%s.tmp" % (path, os.getpid(), os.urandom(4).hex())
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(SECRET_SIZE))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            pass  # another server won the race; use its secret
    finally:
        os.unlink(temp)
    return _read_secret(path)


def _read_secret(path):
    # Not through a link, and never blocking (a FIFO put there): a secret
    # that someone else placed or can swap would let them forge keys.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as error:
        if os.path.islink(path):
            raise SecretFileError("%s is a symbolic link; the secret must be a file of "
                                  "its own" % path) from None
        raise SecretFileError("cannot open the secret file %s: %s"
                              % (path, error.strerror or error)) from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise SecretFileError("%s is not a regular file" % path)
        if status.st_uid != os.geteuid():
            raise SecretFileError("%s belongs to uid %d, not to this server's user (uid %d)"
                                  % (path, status.st_uid, os.geteuid()))
        if status.st_mode & 0o077:
            raise SecretFileError(
                "%s is accessible by group or others (mode %o); chmod 600 it"
                % (path, status.st_mode & 0o777))
        secret = os.read(fd, SECRET_SIZE + 1)  # a regular file's read is not cut short
    finally:
        os.close(fd)
    if len(secret) != SECRET_SIZE:
        raise SecretFileError("%s holds %d bytes, expected %d"
                              % (path, len(secret), SECRET_SIZE))
    return secret
