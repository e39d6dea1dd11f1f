"""R4: writes, fsyncs and truncations fail with ENOSPC or EIO.

The N-th call of one I/O seam of the log fails (once, or from then on),
for N = 1, 2, ... until the workload runs through.  Whatever happens:
the file always reopens; a commit that raised is there entirely or not
at all; every commit that returned is there; what the failing process
shows in memory is what the file holds; and after a StorageError the
database refuses further writes with StorageError, unless a write found
no room (ENOSPC): that fails only its own record.

The workload also meets torn tails left by "another process", so that
recovery's truncation is exercised too.
"""

import errno
import os

import pytest
import transaction

from dobbin.database import Database
from dobbin.exc import DobbinError, StorageError
from dobbin.log import Log
from dobbin.persistent import PersistentDict, checkout

from .conftest import (FULL, History, OpenError, as_bytes, figures, layout, open_state,
                       snapshot, workload)

STEPS = 25
SEED = 21
TORN_EVERY = 6  # steps between torn tails left by another writer


class Faults:
    """Makes the N-th call of one seam of every Log raise OSError."""

    def __init__(self, seam, n, code, sticky=False, partial=False):
        self.seam, self.n, self.code, self.sticky, self.partial = seam, n, code, sticky, partial
        self.calls = 0
        self.fired = 0
        self.armed = True

    def _fails_now(self):
        if not self.armed:
            return False
        self.calls += 1
        fails = self.calls == self.n or (self.sticky and self.calls > self.n)
        self.fired += fails
        return fails

    def error(self):
        return OSError(self.code, os.strerror(self.code))

    def install(self, monkeypatch):
        faults = self
        real = {name: getattr(Log, name) for name in ("_write", "_sync", "_truncate")}

        def _write(log, buffers, offset):
            if faults.seam == "write" and faults._fails_now():
                if faults.partial:
                    data = as_bytes(buffers)
                    real["_write"](log, data[:len(data) // 2], offset)
                raise faults.error()
            return real["_write"](log, buffers, offset)

        def _sync(log):
            if faults.seam == "sync" and faults._fails_now():
                raise faults.error()
            return real["_sync"](log)

        def _truncate(log, size):
            if faults.seam == "truncate" and faults._fails_now():
                raise faults.error()
            return real["_truncate"](log, size)

        monkeypatch.setattr(Log, "_write", _write)
        monkeypatch.setattr(Log, "_sync", _sync)
        monkeypatch.setattr(Log, "_truncate", _truncate)


def leave_torn_tail(path):
    """Another writer died half-way through a record, written where the
    records end (before any space reserved after them)."""
    log = Log(path, read_only=True)
    try:
        for _record in log.follow():
            pass
    finally:
        log.close()
    end = log.end
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(b"DTXRC\0\0\0" + bytes(30))


def run(path, faults):
    """Run the workload under `faults`; return what the test must check.

    The file exists already: opening it (recovery, its fsync) is the
    first thing that may fail.
    """
    outcome = {"returned": 0, "error": None, "memory": None, "refused": None,
               "created": True}
    try:
        history = History(path, seed=SEED, durability="fsync")
    except (OSError, DobbinError) as error:
        outcome.update(error=error, created=False)
        faults.armed = False
        return outcome
    try:
        for step, tid in enumerate(workload(history, STEPS)):
            outcome["returned"] = tid
            if step % TORN_EVERY == TORN_EVERY - 1:
                leave_torn_tail(path)
    except Exception as error:
        transaction.abort()
        outcome["error"] = error
        try:
            outcome["memory"] = (history.db.tx_count, snapshot(history.db))
        except Exception as reading:
            outcome["memory"] = "reading raised %s: %s" % (type(reading).__name__, reading)
        if isinstance(error, StorageError) and not found_no_room(error):
            size = os.path.getsize(path)
            try:
                history.set_key()
            except StorageError:
                outcome["refused"] = os.path.getsize(path) == size
            except Exception as other:
                outcome["refused"] = "raised %s: %s" % (type(other).__name__, other)
            else:
                outcome["refused"] = False
            transaction.abort()
    finally:
        faults.armed = False
        history.close()
    return outcome


def found_no_room(error):
    """A write refused for want of room: only its record failed."""
    cause = error.__cause__
    return isinstance(cause, OSError) and cause.errno == errno.ENOSPC and "no room" in str(error)


def check(path, outcome, states):
    """What is wrong with the file and the outcome (None: nothing)."""
    try:
        opened = open_state(path)
    except OpenError as error:
        return "the file does not reopen: %s" % error
    returned, error = outcome["returned"], outcome["error"]
    if opened.tx_count < returned:
        return "lost commits: reopened at %d, commit %d had returned" % (
            opened.tx_count, returned)
    if opened.tx_count > returned + (error is not None):
        return "reopened at %d, but only %d commits were made" % (opened.tx_count, returned)
    if opened.state != states[opened.tx_count]:
        return "the state is not transaction %d's: partly applied" % opened.tx_count
    if error is None:
        return None
    if not isinstance(error, (DobbinError, OSError)):
        return "the commit raised %s: %s" % (type(error).__name__, error)
    memory = outcome["memory"]
    if memory is not None and memory != (opened.tx_count, opened.state):
        shown = memory if isinstance(memory, str) else "transaction %d" % memory[0]
        return "memory shows %s, the file holds transaction %d" % (shown, opened.tx_count)
    if (isinstance(error, StorageError) and not found_no_room(error) and outcome["created"]
            and outcome["refused"] is not True):
        return "after StorageError a further commit was not refused cleanly (%s)" % (
            outcome["refused"],)
    return None


def plans():
    """(seam, code, sticky, partial) combinations to try at every N."""
    if FULL:
        for code in (errno.ENOSPC, errno.EIO):
            for sticky in (False, True):
                for partial in (False, True):
                    yield "write", code, sticky, partial
                yield "sync", code, sticky, False
                yield "truncate", code, sticky, False
    else:
        yield "write", errno.ENOSPC, False, True
        yield "write", errno.EIO, True, False
        yield "sync", errno.EIO, False, False
        yield "truncate", errno.EIO, False, False
        yield "truncate", errno.ENOSPC, True, False


def test_io_errors_never_lose_or_half_apply_a_commit(scratch_dir, monkeypatch):
    monkeypatch.setattr("dobbin.database.CHECKPOINT_MIN_BYTES", 4096)
    monkeypatch.setattr("dobbin.stream.STAGE_MIN", 1)  # its stored files are staged
    reference_path = os.path.join(scratch_dir, "reference.dobbin")
    Database(reference_path).close()
    reference = History(reference_path, seed=SEED, durability="fsync")
    for step, _tid in enumerate(workload(reference, STEPS)):
        if step % TORN_EVERY == TORN_EVERY - 1:
            leave_torn_tail(reference.path)
    reference.close()
    states = reference.states
    assert any(span.status == b"X" for span in layout(reference_path)), "no checkpoint written"
    runs = failures = wrong = 0
    raised = {}
    problems = []
    for seam, code, sticky, partial in plans():
        n = 0
        while True:
            n += 1
            path = os.path.join(scratch_dir, "run-%d.dobbin" % runs)
            Database(path).close()
            faults = Faults(seam, n, code, sticky, partial)
            with monkeypatch.context() as patch:
                faults.install(patch)
                outcome = run(path, faults)
            runs += 1
            if not faults.fired:
                assert outcome["error"] is None, outcome["error"]
                break  # the workload ran through: every N of this seam is done
            failures += 1
            error = outcome["error"]
            kind = "%s:%s" % (seam, "nothing" if error is None else type(error).__name__)
            raised[kind] = raised.get(kind, 0) + 1
            found = check(path, outcome, states)
            if found is not None:
                wrong += 1
                if len(problems) < 15:
                    problems.append("%s %s call %d (%s%s): %s" % (
                        errno.errorcode[code], seam, n, "from then on" if sticky else "once",
                        ", half written" if partial else "", found))
    figures("R4 I/O errors", runs=runs, injected_failures=failures, wrong=wrong,
            raised=raised)
    assert not wrong, "%d of %d failing runs went wrong:\n%s" % (
        wrong, failures, "\n".join(problems))


def test_a_failed_fsync_after_cutting_a_torn_tail_refuses_further_writes(tmp_path):
    # The same rule as for a commit's own fsync: once an fsync failed, the
    # page cache can't be trusted, so the log must refuse writes.
    path = str(tmp_path / "db.dobbin")
    db = Database(path)
    root = PersistentDict()
    db.elect(root)
    transaction.commit()
    leave_torn_tail(path)
    real_sync = db._log._sync
    calls = []

    def sync_fails_once():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_sync()

    db._log._sync = sync_fails_once
    checkout(root)
    root["first"] = 1
    try:
        with pytest.raises(StorageError):
            transaction.commit()
        transaction.abort()
        checkout(root)
        root["second"] = 2
        with pytest.raises(StorageError):
            transaction.commit()
    finally:
        transaction.abort()
        db.close()


def test_io_errors_while_the_file_is_created(tmp_path, monkeypatch):
    # The header's write or fsync fails: opening raises, but the path must
    # open once the disk is fine again (nothing can be in the file yet).
    tried, problems = 0, []
    for seam, partial in (("write", False), ("write", True), ("sync", False)):
        for sticky in (False, True):
            path = str(tmp_path / ("new-%d.dobbin" % tried))
            faults = Faults(seam, 1, errno.ENOSPC if seam == "write" else errno.EIO,
                            sticky, partial)
            with monkeypatch.context() as patch:
                faults.install(patch)
                try:
                    Database(path).close()
                except (OSError, DobbinError):
                    pass
                faults.armed = False
            tried += 1
            assert faults.fired
            try:
                opened = open_state(path)
            except OpenError as error:
                problems.append("%s failing (%s%s): %s" % (
                    seam, "from then on" if sticky else "once",
                    ", half written" if partial else "", error))
            else:
                assert opened.tx_count == 0 and opened.state is None
    figures("R4 creation", runs=tried, wrong=len(problems))
    assert not problems, "\n".join(problems)
