"""broker.keys: stable keys under one secret, forgeries refused, the secret file guarded."""

import os
import stat
import threading

import pytest
from zope.interface.verify import verifyObject

from broker.exc import AccessDenied, SecretFileError
from broker.interfaces import IKeyRing
from broker.keys import SECRET_SIZE, Key, KeyRing, load_or_create_secret, secret_path_for

RING = KeyRing(b"s" * 32)


def test_implements_interface():
    assert verifyObject(IKeyRing, RING)


def test_sign_and_verify():
    key = RING.sign("o", 42)
    assert key.kind == "o" and key.ident == 42 and len(key.mac) == 16
    assert RING.verify(key) == 42
    assert RING.verify(RING.sign("s", ("root", 1))) == ("root", 1)
    assert RING.verify(RING.sign("f", (3, "data"))) == (3, "data")


def test_same_secret_same_keys():
    assert KeyRing(b"s" * 32).sign("o", 1) == RING.sign("o", 1)
    assert KeyRing(b"t" * 32).sign("o", 1) != RING.sign("o", 1)


@pytest.mark.parametrize("forged", [
    Key("o", 42, b"\x00" * 16),                     # made-up MAC
    Key("o", 43, RING.sign("o", 42).mac),            # MAC of another object
    Key("s", ("root",), RING.sign("o", 42).mac),     # MAC of another kind
    Key("n", 42),                                    # unsigned client key
])
def test_forged_keys_are_denied(forged):
    with pytest.raises(AccessDenied):
        RING.verify(forged)


def test_other_secret_is_denied():
    with pytest.raises(AccessDenied, match="invalid key"):
        RING.verify(KeyRing(b"t" * 32).sign("o", 1))


def test_kinds_can_be_restricted():
    with pytest.raises(AccessDenied, match="not allowed"):
        RING.verify(RING.sign("s", ("x",)), kinds="o")


def test_not_a_key_is_denied():
    with pytest.raises(AccessDenied, match="expected an object key"):
        RING.verify(("o", 1))


@pytest.mark.parametrize("kind, ident, mac", [
    ("x", 1, b""), ("o", -1, b""), ("o", "1", b""), ("o", 2 ** 63, b""),
    ("s", (), b""), ("s", ("a",) * 17, b""), ("s", (1.5,), b""), ("f", (1,), b""),
    ("f", (1, ""), b""), ("o", 1, b"short"),
])
def test_malformed_keys_are_denied(kind, ident, mac):
    with pytest.raises(AccessDenied):
        Key(kind, ident, mac)


def test_keys_are_immutable_and_hashable():
    key = RING.sign("o", 1)
    with pytest.raises(AttributeError):
        key.ident = 2
    assert {key: 1}[RING.sign("o", 1)] == 1
    assert key.token == ("o", 1)
    assert str(key) == "oid 1" and "oid 1" in repr(key)


def test_short_secret_is_refused():
    with pytest.raises(SecretFileError):
        KeyRing(b"short")


def test_secret_file_is_created_private_and_reused(tmp_path):
    path = secret_path_for(tmp_path / "db.dobbin")
    assert path.endswith("db.dobbin.broker-secret")
    secret = load_or_create_secret(path)
    assert len(secret) == SECRET_SIZE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(path) == secret
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_open_secret_file_is_refused(tmp_path):
    path = str(tmp_path / "secret")
    load_or_create_secret(path)
    os.chmod(path, 0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        load_or_create_secret(path)


def test_damaged_secret_file_is_refused(tmp_path):
    path = str(tmp_path / "secret")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"too short")
    os.close(fd)
    with pytest.raises(SecretFileError, match="holds 9 bytes"):
        load_or_create_secret(path)


def make_link(tmp_path, path):
    target = str(tmp_path / "elsewhere")
    load_or_create_secret(target)  # a good secret, but not this file
    os.symlink(target, path)


def make_dangling_link(tmp_path, path):
    os.symlink(str(tmp_path / "nothing"), path)


@pytest.mark.parametrize("make, message", [
    (make_link, "symbolic link"),
    (make_dangling_link, "symbolic link"),
    (lambda tmp_path, path: os.mkdir(path), "not a regular file"),
    (lambda tmp_path, path: os.mkfifo(path, 0o600), "not a regular file"),
])
def test_a_secret_path_that_is_not_a_file_of_its_own_is_refused(tmp_path, make, message):
    # A link was followed (its target's bytes became the secret), and a
    # FIFO made the server wait for ever.
    path = str(tmp_path / "secret")
    make(tmp_path, path)
    with pytest.raises(SecretFileError, match=message):
        load_or_create_secret(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_secret_file_of_another_user_is_refused(tmp_path):
    path = str(tmp_path / "secret")
    load_or_create_secret(path)
    os.chown(path, 4242, -1)
    with pytest.raises(SecretFileError, match="belongs to uid 4242"):
        load_or_create_secret(path)


def test_concurrent_creation_agrees_on_one_secret(tmp_path):
    path = str(tmp_path / "secret")
    results = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_secret(path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1


def test_recent_keys_are_remembered_within_a_bound(monkeypatch):
    import broker.keys
    ring = KeyRing(b"m" * 32)
    assert ring.sign("o", 1) is ring.sign("o", 1)
    assert ring.verify(ring.sign("o", 1)) == 1
    with pytest.raises(AccessDenied):
        ring.verify(Key("o", 1, b"\x01" * 16))   # remembered MAC, forged key: still refused
    monkeypatch.setattr(broker.keys, "MEMO_SIZE", 4)
    for n in range(10):
        assert ring.verify(ring.sign("o", n)) == n
    assert len(ring._signed) <= 4
