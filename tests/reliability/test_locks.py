"""R8: the write lock across processes and threads.

One writer at a time across processes; the lock goes the moment its
holder is killed; closing some other descriptor of the file, in another
thread, does not drop it (flock, not POSIX fcntl locks); a writer that
waits too long gets a clear LockTimeoutError.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import transaction

from dobbin.database import Database
from dobbin.exc import LockTimeoutError
from dobbin.log import Log
from dobbin.persistent import PersistentDict, checkout

from .conftest import figures, scaled

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)


def helper(*arguments, **options):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, ROOT, env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "reliability.lock_holder"]
                            + [str(argument) for argument in arguments],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            text=True, **options)


@pytest.fixture
def path(tmp_path):
    path = str(tmp_path / "db.dobbin")
    Database(path).close()
    return path


@pytest.fixture
def holder(path):
    """Another process holding the write lock; killed after the test."""
    process = helper("hold", path)
    assert process.stdout.readline().strip() == "locked"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()
    process.stdout.close()


def test_one_writer_at_a_time_across_processes(tmp_path, path):
    log = str(tmp_path / "turns.txt")
    times = scaled(50, 500)
    processes = [helper("cycle", path, log, times) for _ in range(3)]
    for process in processes:
        assert process.wait(timeout=120) == 0
        process.stdout.close()
    with open(log) as f:
        lines = f.read().split()
    events = list(zip(lines[0::2], lines[1::2]))
    assert len(events) == 2 * 3 * times
    overlaps = sum(1 for (what, pid), (next_what, next_pid) in zip(events[0::2], events[1::2])
                   if (what, next_what) != ("enter", "exit") or pid != next_pid)
    figures("R8 one writer", turns=len(events) // 2, overlaps=overlaps)
    assert overlaps == 0


def test_a_waiting_writer_gets_a_clear_lock_timeout_error(path, holder):
    started = time.monotonic()
    with pytest.raises(LockTimeoutError) as caught:
        Database(path, lock_timeout=0.3)
    waited = time.monotonic() - started
    message = str(caught.value)
    assert path in message and "0.3" in message and "another process" in message
    assert 0.3 <= waited < 2.0


def test_a_commit_that_waits_too_long_fails_cleanly(path):
    db = Database(path, lock_timeout=0.3)
    db.elect(PersistentDict())
    transaction.commit()
    process = helper("hold", path)
    try:
        assert process.stdout.readline().strip() == "locked"
        checkout(db.root)
        db.root["x"] = 1
        with pytest.raises(LockTimeoutError):
            transaction.commit()
        transaction.abort()
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    checkout(db.root)
    db.root["x"] = 2
    transaction.commit()
    assert db.tx_count == 2
    db.close()


def test_the_lock_goes_the_moment_its_holder_is_killed(path, holder):
    result = {}

    def wait_for_it():
        db = Database(path, lock_timeout=10)
        result["at"] = time.monotonic()
        db.close()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.2)
    assert "at" not in result, "the lock was taken while its holder lived"
    killed = time.monotonic()
    holder.send_signal(signal.SIGKILL)
    waiter.join(timeout=15)
    delay = result["at"] - killed
    figures("R8 kill releases", seconds_to_take_over=round(delay, 4))
    assert delay < 0.5


def test_closing_another_descriptor_does_not_release_the_lock(path):
    db = Database(path)
    db._lock.acquire()
    try:
        def open_and_close_others():
            with open(path, "rb") as f:
                f.read(8)
            os.close(os.open(path, os.O_RDWR))
            Log(path, read_only=True).close()
            other = Database(path, read_only=True)
            other.close()

        thread = threading.Thread(target=open_and_close_others)
        thread.start()
        thread.join()
        tried = helper("try", path, 0.3)
        out, _ = tried.communicate(timeout=30)
        assert out.startswith("timeout:"), out
    finally:
        db._lock.release()
    tried = helper("try", path, 5)
    out, _ = tried.communicate(timeout=30)
    assert out.strip() == "opened"
    db.close()


def test_two_databases_in_one_process_exclude_each_other(path):
    first = Database(path)
    second = Database(path, lock_timeout=0.2)
    first._lock.acquire()
    try:
        with pytest.raises(LockTimeoutError):
            second._lock.acquire()
    finally:
        first._lock.release()
    second._lock.acquire()
    second._lock.release()
    first.close()
    second.close()
