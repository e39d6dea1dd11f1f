"""broker.states: sealing records for key holders only, and the server's state cache."""

import os

from broker.keys import KeyRing
from broker.states import ENTRY_OVERHEAD, StateCache, seal, unseal

RING = KeyRing(b"s" * 32)


def test_seal_round_trips_only_with_the_key_mac():
    record = b"\x83\xa5class\xa4a.B\xa6serial\x05\xa5state\x81\xa4name\xa5Alice"
    mac = RING.sign("o", 5).mac
    sealed = seal(mac, 77, 12, record)
    assert len(sealed) == len(record) and sealed != record
    assert b"Alice" not in sealed
    assert unseal(mac, 77, 12, sealed) == record
    assert unseal(RING.sign("o", 6).mac, 77, 12, sealed) != record   # another object's key
    assert unseal(mac, 78, 12, sealed) != record                     # another server run
    assert unseal(mac, 77, 13, sealed) != record                     # another transaction


def test_seal_streams_differ_per_transaction():
    mac, record = RING.sign("o", 5).mac, bytes(64)
    assert seal(mac, 1, 1, record) != seal(mac, 1, 2, record)
    assert seal(mac, 1, 1, b"") == b""
    big = os.urandom(100000)
    assert unseal(mac, 1, 1, seal(mac, 1, 1, big)) == big


def test_cache_serves_an_entry_between_its_serial_and_top():
    cache = StateCache(top=10)
    cache.put(1, 7, b"r7", as_of=10)
    assert cache.get(1, 10) == b"r7" and cache.get(1, 7) == b"r7"
    assert cache.get(1, 6) is None     # older snapshot: another version
    assert cache.get(1, 11) is None    # beyond what the cache knows
    cache.changed(11, {2})
    assert cache.get(1, 11) == b"r7"   # 1 did not change in 11
    cache.changed(12, {1}, {1: b"r12"})
    assert cache.get(1, 11) is None and cache.get(1, 12) == b"r12"
    cache.changed(13, {1})
    assert cache.get(1, 13) is None and len(cache) == 0


def test_cache_refuses_a_put_after_top_moved():
    cache = StateCache(top=10)
    top = cache.top
    cache.changed(11, {1})             # a commit learned while the record was made
    cache.put(1, 7, b"r7", as_of=top)
    assert cache.get(1, 10) is None and len(cache) == 0


def test_tiny_records_count_their_bookkeeping_too():
    cache = StateCache(top=1, max_bytes=100 * ENTRY_OVERHEAD)
    for oid in range(1000):
        cache.put(oid, 1, b"r", as_of=1)
    assert len(cache) <= 100 and cache._bytes <= cache.max_bytes


def test_cache_is_bounded_dropping_the_oldest():
    cache = StateCache(top=1, max_bytes=1000)
    for oid in range(30):
        cache.put(oid, 1, bytes(100), as_of=1)
    assert cache._bytes <= 1000
    assert cache.get(29, 1) is not None and cache.get(0, 1) is None
