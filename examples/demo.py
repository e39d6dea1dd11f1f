"""Dobbin's main job: many writers, one counter, no lost updates.

    python examples/demo.py [PATH]      (PATH defaults to ./demo.dobbin)

Four threads and then two processes each add 1 to one shared counter,
every time in its own transaction.  When two writers race, the loser's
commit raises ConflictError and `transaction.manager.attempts()` runs
its transaction again on fresh state, so no increment is lost.  Then the
same database is served over ZeroMQ on loopback, and two broker clients
take turns: one commits an increment, the other sees it after begin().
Run it as often as you like: the counter keeps growing and each run
checks its own delta.  Exits 1 if an increment went missing.
"""

import argparse
import multiprocessing
import os
import sys
import threading

import transaction

from dobbin.database import Database
from dobbin.persistent import Persistent, PersistentDict, checkout

THREADS = 4          # writer threads per process
INCREMENTS = 50      # increments per thread
PROCESSES = 2        # extra processes, each with THREADS threads of its own
MAX_ATTEMPTS = 1000  # attempts() gives up after this many conflicts in a row


class Counter(Persistent):
    """A persistent object: shared read-only, changed only after checkout."""

    def __init__(self, name):
        # Attributes set in __init__ need no checkout: the object is new.
        self.name = name
        self.value = 0


def add_one(counter):
    """Add 1 to `counter` in a transaction of its own; return the retries.

    We count loop turns rather than catch ConflictError around the body:
    the conflict is usually found at commit, which runs when the `with`
    block exits, and attempts() swallows it there to try again.
    """
    turns = 0
    for attempt in transaction.manager.attempts(MAX_ATTEMPTS):
        turns += 1
        with attempt:  # commits on exit, or swallows a conflict to retry
            checkout(counter)   # a private copy for this thread, so the
            counter.value += 1  # write stays invisible until the commit
    return turns - 1


def run_threads(counter):
    """Hammer `counter` from THREADS threads; return the conflicts retried."""
    retries, errors = [], []

    def work():
        try:
            retries.append(sum(add_one(counter) for _ in range(INCREMENTS)))
        except Exception as error:  # reported below; the count check fails
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        print("  a writer thread failed: %r" % (error,), file=sys.stderr)
    return sum(retries)


def run_in_process(path):
    """One child process: its own Database on the same file, same work."""
    # Processes share nothing but the file: its lock orders their commits
    # and each commit first catches up with what the others wrote.
    with Database(path) as db:
        return run_threads(db.root["counter"])


def open_counter(db):
    """The shared counter, creating the root on the database's first run."""
    if db.root is None:
        db.elect(PersistentDict(counter=Counter("visits")))
        transaction.commit()
    return db.root["counter"]


def broker_session(db):
    """Serve `db` over ZeroMQ and run two clients against it; True if right."""
    from broker.client import BrokerClient
    from broker.server import BrokerServer

    server = BrokerServer(db, address="tcp://127.0.0.1:*")  # any free port
    server.export_class(Counter)          # clients may change counters
    server.export_class(PersistentDict)   # and read the root mapping
    with server:
        alice = BrokerClient(server.address, timeout=5)
        bob = BrokerClient(server.address, timeout=5)
        try:
            before = bob.root["counter"].value   # bob's snapshot starts here
            counter = alice.root["counter"]      # a proxy of the same object
            counter.value += 1                   # recorded locally...
            tid = alice.commit()                 # ...sent as one verified update
            during = bob.root["counter"].value   # bob's snapshot is unchanged
            bob.begin()                          # a new snapshot sees the commit
            after = bob.root["counter"].value
        finally:
            alice.close()
            bob.close()
    print("Broker session on %s" % server.address)
    print("  alice committed transaction %d: counter %d -> %d" % (tid, before, before + 1))
    print("  bob saw %d until begin(), then %d" % (during, after))
    return during == before and after == before + 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="demo.dobbin",
                        help="database file (default: ./demo.dobbin)")
    args = parser.parse_args(argv)
    path = os.path.abspath(args.path)

    with Database(path) as db:
        counter = open_counter(db)
        before = counter.value

        retries = run_threads(counter)
        # "spawn": a fresh interpreter per child, because forking a
        # process that has threads and an open database is unsafe.
        with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
            retries += sum(pool.map(run_in_process, [path] * PROCESSES))

        db.sync()  # catch up with the children's commits
        delta = counter.value - before
        expected = THREADS * INCREMENTS * (1 + PROCESSES)

        print("Dobbin demo on %s" % path)
        print("  transactions in file : %d" % db.tx_count)
        print("  objects              : %d" % len(db))
        print("  counter              : %d -> %d (+%d, expected +%d)"
              % (before, counter.value, delta, expected))
        print("  conflicts retried    : %d" % retries)
    if delta != expected:
        print("FAILED: %d increments lost" % (expected - delta))
        return 1
    with Database(path) as db:
        if not broker_session(db):
            print("FAILED: the broker clients did not see the expected values")
            return 1
    print("OK: no increment lost")
    return 0


if __name__ == "__main__":
    # The database stores a class by module and name, and a spawned child
    # sees this file as "__mp_main__", not "__main__".  So run everything
    # from the importable module `demo` (this file, found on sys.path[0]),
    # under one name in every process.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import demo
    sys.exit(demo.main())
