"""Tests of dobbin.lock: one writer per file across threads and processes.

The probes that must see another process's lock run in a real child
process: POSIX record locks, unlike flock, never conflict within one
process, so an in-process probe could not tell them apart."""

import contextlib
import fcntl
import multiprocessing
import os
import signal
import threading

import pytest

from dobbin.exc import DobbinError, LockTimeoutError, ReadOnlyError
from dobbin.lock import WriteLock, flock_within

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def lock_file(db_path):
    with open(db_path, "wb") as f:
        f.write(b"x")
    return db_path


@pytest.fixture
def new_lock(lock_file):
    """A WriteLock on a descriptor of its own, closed after the test."""
    fds = []

    def new_lock(timeout=5.0):
        fd = os.open(lock_file, os.O_RDWR)
        fds.append(fd)
        return WriteLock(fd, lock_file, timeout)

    yield new_lock
    for fd in fds:
        os.close(fd)


def _hold_forever(path, ready):
    fd = os.open(path, os.O_RDWR)
    WriteLock(fd, path).acquire()
    ready.set()
    threading.Event().wait()  # until killed


def _probe(path, results):
    """Report whether the lock can be had at once from this process."""
    fd = os.open(path, os.O_RDWR)
    try:
        WriteLock(fd, path).acquire(timeout=0)
    except LockTimeoutError as error:
        results.put(("busy", str(error)))
    else:
        results.put(("free", None))
    finally:
        os.close(fd)


def probe_from_another_process(path):
    results = SPAWN.Queue()
    child = SPAWN.Process(target=_probe, args=(path, results))
    child.start()
    outcome = results.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    return outcome


def test_lock_released_at_once_when_holder_is_sigkilled(lock_file, new_lock):
    ready = SPAWN.Event()
    holder = SPAWN.Process(target=_hold_forever, args=(lock_file, ready))
    lock = new_lock()
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(LockTimeoutError):
            lock.acquire(timeout=0)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(60)
    assert holder.exitcode == -signal.SIGKILL
    lock.acquire(timeout=0)  # no waiting: the kernel dropped it with the process
    assert lock.held
    lock.release()


def test_closing_another_descriptor_in_another_thread_keeps_the_lock(lock_file, new_lock):
    lock = new_lock()
    lock.acquire()

    def open_and_close():
        fd = os.open(lock_file, os.O_RDWR)
        os.close(fd)

    thread = threading.Thread(target=open_and_close)
    thread.start()
    thread.join(30)
    assert probe_from_another_process(lock_file)[0] == "busy"
    lock.release()
    assert probe_from_another_process(lock_file)[0] == "free"


def test_acquire_times_out_while_another_process_holds_the_lock(lock_file, new_lock):
    lock = new_lock()
    lock.acquire()
    state, message = probe_from_another_process(lock_file)
    assert state == "busy"
    assert lock_file in message and "another process" in message
    lock.release()


@contextlib.contextmanager
def held_by_another_thread(lock):
    """`lock` held by another thread for the duration of the block."""
    taken, done = threading.Event(), threading.Event()

    def hold():
        lock.acquire()
        taken.set()
        done.wait(30)
        lock.release()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert taken.wait(30)
        yield
    finally:
        done.set()
        thread.join(30)


def test_acquire_times_out_while_another_thread_holds_the_lock(lock_file, new_lock):
    lock = new_lock(timeout=0.05)
    with held_by_another_thread(lock):
        with pytest.raises(LockTimeoutError, match="another thread") as caught:
            lock.acquire()
        assert lock_file in str(caught.value)
        assert not lock.held
        # A second descriptor in this process is excluded too (flock is per
        # open file description, not per process).
        with pytest.raises(LockTimeoutError, match="another process"):
            new_lock().acquire(timeout=0.05)
    lock.acquire(timeout=0)
    lock.release()


def test_release_by_a_thread_that_does_not_hold_the_lock_raises(new_lock):
    lock = new_lock()
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()
    lock.acquire()
    errors = []

    def release_elsewhere():
        try:
            lock.release()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=release_elsewhere)
    thread.start()
    thread.join(30)
    assert len(errors) == 1 and "not held" in str(errors[0])
    assert lock.held  # still ours
    lock.release()
    assert not lock.held


def test_lock_is_not_reentrant(new_lock):
    lock = new_lock()
    with lock:
        with pytest.raises(RuntimeError, match="not reentrant"):
            lock.acquire(timeout=0)
        assert lock.held
    assert not lock.held


def _hold_until(path, ready, done):
    fd = os.open(path, os.O_RDWR)
    WriteLock(fd, path).acquire()
    ready.set()
    done.wait(60)


def test_closing_waits_for_the_writing_thread_then_keeps_threads_out(new_lock):
    lock = new_lock()
    holding, finish = threading.Event(), threading.Event()
    order = []

    def writer():
        lock.acquire()
        holding.set()
        finish.wait(30)
        order.append("writer done")
        lock.release()

    def closer():
        with lock.closing() as alone:
            order.append(("closing", alone))
            try:
                lock.acquire(timeout=0.05)
            except LockTimeoutError:
                order.append("threads kept out")

    threads = [threading.Thread(target=writer)]
    threads[0].start()
    assert holding.wait(30)
    threads.append(threading.Thread(target=closer))
    threads[1].start()
    threads[1].join(0.3)
    assert threads[1].is_alive()  # waiting for the writer, which waits for us
    finish.set()
    for thread in threads:
        thread.join(30)
    assert order == ["writer done", ("closing", True), "threads kept out"]


def test_closing_beside_another_process_or_in_the_holding_thread(lock_file, new_lock):
    fd = os.open(lock_file, os.O_RDWR)
    lock = WriteLock(fd, lock_file, timeout=5)
    lock.acquire()
    with lock.closing() as alone:  # its own hold: kept, nothing to wait for
        assert alone is False and lock.held
        os.close(fd)
    lock.release()
    lock = new_lock()
    ready, done = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_until, args=(lock_file, ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        with lock.closing() as alone:
            assert alone is False  # that process writes through its own descriptor
    finally:
        done.set()
        holder.join(60)


def _flock_held(path):
    probe = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(probe)


@contextlib.contextmanager
def closed_and_number_reused(lock_file, tmp_path, hold=False):
    """(lock, descriptor): a WriteLock (held first, with `hold`) whose file
    closed inside closing(), and another file's descriptor that took its
    number and holds that file's lock."""
    other = str(tmp_path / "other")
    open(other, "w").close()
    fd = os.open(lock_file, os.O_RDWR)
    lock = WriteLock(fd, lock_file, timeout=1)
    if hold:
        lock.acquire()
    with lock.closing():
        os.close(fd)
    reused = os.open(other, os.O_RDONLY)
    try:
        assert reused == fd  # the lowest free number
        fcntl.flock(reused, fcntl.LOCK_EX)
        yield lock, other
    finally:
        os.close(reused)


def test_after_closing_the_lock_never_touches_its_descriptor_number_again(lock_file, tmp_path):
    # A thread that passed the database's "closed?" check before close()
    # took the lock flocked the closed descriptor's number afterwards: the
    # number of whatever file opened next, whose lock it then dropped.
    with closed_and_number_reused(lock_file, tmp_path) as (lock, other):
        with pytest.raises(ReadOnlyError, match="closed"):
            lock.acquire()
        with pytest.raises(ReadOnlyError):
            with lock.closing():
                pass
        assert lock.busy() is False
        assert _flock_held(other)


def test_a_holder_that_closes_releases_without_touching_the_descriptor(lock_file, tmp_path):
    with closed_and_number_reused(lock_file, tmp_path, hold=True) as (lock, other):
        lock.release()
        assert _flock_held(other) and not lock.held


def test_closing_times_out_on_a_thread_that_keeps_the_lock(new_lock):
    lock = new_lock(timeout=0.05)
    with held_by_another_thread(lock):
        with pytest.raises(LockTimeoutError, match="another thread"):
            with lock.closing():
                pass


def test_busy_tells_whether_a_thread_or_process_holds_the_lock(lock_file, new_lock):
    lock = new_lock()
    assert not lock.busy()
    with lock:
        assert lock.busy()  # the caller's own hold counts too
    with held_by_another_thread(lock):
        assert lock.busy()
    assert not lock.busy()
    ready, done = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_until, args=(lock_file, ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        assert lock.busy()
    finally:
        done.set()
        holder.join(60)
    assert not lock.busy()
    # The probe took and dropped the lock: nothing of it is left behind.
    assert probe_from_another_process(lock_file)[0] == "free"
    lock.acquire(timeout=0)
    lock.release()


def _refused_in_a_forked_child(lock):
    """Run each flock-taking use of `lock` in a forked child; return how
    many raised DobbinError (the child shares the parent's file lock)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        refused = 0
        uses = (lock.busy, lambda: lock.acquire(timeout=0), lambda: lock.closing().__enter__(),
                lock.release)  # forked by the holding thread, it passed the owner check
        for use in uses:
            try:
                use()
            except DobbinError:
                refused += 1
            except BaseException:
                pass
        os.write(writer, bytes([refused]))
        os._exit(0)
    os.close(writer)
    try:
        return os.read(reader, 1)[0]
    finally:
        os.close(reader)
        os.waitpid(pid, 0)


def test_a_forked_child_can_neither_probe_nor_take_its_parents_lock(lock_file, new_lock):
    lock = new_lock()
    lock.acquire()
    try:
        assert _refused_in_a_forked_child(lock) == 4
        # Its probe or release would have dropped the shared lock.
        assert probe_from_another_process(lock_file)[0] == "busy"
    finally:
        lock.release()
    assert _refused_in_a_forked_child(lock) == 4  # free or not: not the child's


@pytest.mark.parametrize("timeout", ["1", None, -0.5, float("inf"), float("nan")])
def test_a_wrong_timeout_is_refused(lock_file, timeout):
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises((TypeError, ValueError), match="lock timeout"):
            WriteLock(fd, lock_file, timeout)
    finally:
        os.close(fd)


def test_a_timeout_past_what_threading_can_wait_is_cut_to_it(lock_file):
    # 1e10 (a way to say "for ever") was taken, then every wait on it
    # raised OverflowError, closing a read-only database included.
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT)
    try:
        lock = WriteLock(fd, lock_file, 1e10)
        assert lock.timeout == threading.TIMEOUT_MAX
        lock.acquire()
        lock.release()
        with lock.closing():
            pass
    finally:
        os.close(fd)


def test_flock_within_waits_then_names_its_purpose(lock_file):
    holder, waiter = os.open(lock_file, os.O_RDWR), os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(LockTimeoutError, match="to create it"):
            flock_within(waiter, fcntl.LOCK_SH, 0.05, "create it")
        fcntl.flock(holder, fcntl.LOCK_UN)
        flock_within(waiter, fcntl.LOCK_SH, 0.05, "read it")  # free now: taken at once
    finally:
        os.close(holder)
        os.close(waiter)
