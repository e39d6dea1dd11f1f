"""R3: the power goes at any write or fsync of a running workload.

A wrapper around the log's I/O seams knows which bytes an fsync made
durable.  At a chosen call the power "goes": nothing more is written,
and the disk holds the synced bytes plus any part of the rest (none,
all, a prefix, zeros, garbage, pages written out of order).  Reopening
any of those images must lose no commit whose commit() returned and
show no commit partly applied.
"""

import os
import random
import threading

import pytest
import transaction

from dobbin.database import Database
from dobbin.persistent import PersistentDict, checkout

from .conftest import (FULL, History, OpenError, as_bytes, figures, layout, open_state, read,
                       remove_saved_tails, scaled, write, workload)
from .models import Progress

STEPS = 50
SEED = 11
PAGE = 4096


class PowerCut(BaseException):
    """The power went: no code of the store may run past it."""


class Disk:
    """Wraps one Log's I/O seams: counts calls, tracks what fsync made durable.

    At call `cut_at` the power goes: a write first puts a random part of
    its bytes in the page cache, an fsync or a truncation does nothing.
    """

    def __init__(self, log, cut_at, rng):
        self.log = log
        self.cut_at = cut_at
        self.rng = rng
        self.calls = 0
        self.synced = log.size()  # the header was synced when the file was made
        self._write, self._sync, self._truncate = log._write, log._sync, log._truncate
        log._write, log._sync, log._truncate = self.write, self.sync, self.truncate

    def detach(self):
        """Give the log its own I/O back, to close it: the machine's story
        ended at the cut, and closing (which syncs what a writer left
        unsynced) must neither count as a call nor add to `synced`."""
        log = self.log
        log._write, log._sync, log._truncate = self._write, self._sync, self._truncate

    def _power_goes_now(self):
        self.calls += 1
        return self.calls == self.cut_at

    def write(self, buffers, offset):
        if self._power_goes_now():
            data = as_bytes(buffers)
            self._write(data[:self.rng.randrange(len(data) + 1)], offset)
            raise PowerCut()
        self._write(buffers, offset)

    def sync(self):
        if self._power_goes_now():
            raise PowerCut()
        size = self.log.end  # the records written so far; not space reserved after them
        self._sync()
        self.synced = size

    def truncate(self, size):
        if self._power_goes_now():
            raise PowerCut()
        self._truncate(size)
        self.synced = min(self.synced, size)


def in_order_images(data, synced, rng):
    """(name, bytes) the disk may hold if pages reach it in file order."""
    unsynced = len(data) - synced
    yield "synced bytes only", data[:synced]
    yield "everything written", data
    yield "a prefix of the unsynced bytes", data[:synced + rng.randrange(unsynced + 1)]
    yield "unsynced bytes read as zeros", data[:synced] + bytes(unsynced)
    yield "garbage after the synced bytes", data[:synced] + rng.randbytes(
        rng.randrange(1, unsynced + 200))


def out_of_order_images(data, synced, rng):
    """Pages of the unsynced stretch written out of order: one is missing."""
    unsynced = len(data) - synced
    if unsynced > 0:
        start = synced + rng.randrange(unsynced)
        page = max(start - start % PAGE, synced)
        end = min(start - start % PAGE + PAGE, len(data))
        yield "an unsynced page missing", data[:page] + bytes(end - page) + data[end:]


IMAGES = {"pages in order": in_order_images, "pages out of order": out_of_order_images}


def run_until_cut(path, cut_at, rng):
    """Run the workload with the power going at call `cut_at`.

    Returns (tid of the last commit that returned, the Disk, whether the
    power went).
    """
    history = History(path, seed=SEED, durability="fsync")
    disk = Disk(history.db._log, cut_at, rng)
    returned = 0
    cut = False
    try:
        for tid in workload(history, STEPS):
            returned = tid
    except PowerCut:
        cut = True
    finally:
        disk.detach()
        history.close()
    return returned, disk, cut, history


@pytest.mark.parametrize("ordering", list(IMAGES))
def test_a_power_cut_loses_no_returned_commit_and_applies_none_partly(scratch_dir,
                                                                      monkeypatch, ordering):
    monkeypatch.setattr("dobbin.database.CHECKPOINT_MIN_BYTES", 4096)
    monkeypatch.setattr("dobbin.stream.STAGE_MIN", 1)  # its stored files are staged
    reference_path = os.path.join(scratch_dir, "reference.dobbin")
    _, reference_disk, _, reference = run_until_cut(reference_path, 0, random.Random(0))
    states = reference.states
    total_calls = reference_disk.calls
    assert any(span.status == b"X" for span in layout(reference_path)), "no checkpoint to cut"
    rng = random.Random(12)
    if FULL:
        plan = [cut_at for cut_at in range(1, total_calls + 1) for _ in range(5)]
    else:
        plan = sorted(rng.sample(range(1, total_calls + 1), min(40, total_calls)))
    rounds = images = lost = wrong = 0
    problems = []
    for index, cut_at in enumerate(plan):
        path = os.path.join(scratch_dir, "round-%d.dobbin" % index)
        returned, disk, cut, _history = run_until_cut(path, cut_at, random.Random(index))
        assert cut, "the power cut at call %d never came" % cut_at
        rounds += 1
        data = read(path)
        image_path = path + ".image"
        for name, image in IMAGES[ordering](data, disk.synced, random.Random(index)):
            write(image_path, image)
            images += 1
            try:
                opened = open_state(image_path)
            except OpenError as error:
                outcome = str(error)
            else:
                if opened.tx_count < returned:
                    lost += 1
                    outcome = "lost commits: opened at %d, commit %d had returned" % (
                        opened.tx_count, returned)
                elif opened.tx_count > returned + 1:
                    outcome = "opened at %d, only %d had been attempted" % (
                        opened.tx_count, returned + 1)
                elif opened.state != states[opened.tx_count]:
                    outcome = "the state is not transaction %d's" % opened.tx_count
                else:
                    outcome = None
            remove_saved_tails(image_path)
            if outcome is not None:
                wrong += 1
                if len(problems) < 12:
                    problems.append("cut at call %d (%d returned), %s: %s"
                                    % (cut_at, returned, name, outcome))
        if os.path.exists(image_path):
            os.remove(image_path)
        os.remove(path)
        remove_saved_tails(path)
    figures("R3 power cut, %s" % ordering, rounds=rounds, io_calls_per_run=total_calls,
            images_opened=images, lost_commits=lost, wrong=wrong)
    assert not wrong, "%d of %d images opened wrongly:\n%s" % (wrong, images, "\n".join(problems))


def test_a_checkpoint_never_reaches_the_disk_before_the_records_it_indexes(tmp_path,
                                                                          monkeypatch):
    # A commit big enough to be followed by a checkpoint.  If one fsync
    # covered both, the power could write the checkpoint's pages but not all
    # of the commit's, and opening would build on a commit that is not there.
    # The power goes at each I/O call of that commit; then each page not yet
    # synced goes missing in turn.
    monkeypatch.setattr("dobbin.database.CHECKPOINT_MIN_BYTES", 1024)
    monkeypatch.setattr("dobbin.stream.STAGE_MIN", 1)  # its stored files are staged

    def run(path, cut_at):
        history = History(path, seed=5, durability="fsync")
        for _ in range(5):
            history.set_key(100)
        disk = Disk(history.db._log, cut_at, random.Random(cut_at))
        first_call = disk.calls
        returned = history.db.tx_count
        try:
            history.add_stream(3 * PAGE)
            returned = history.db.tx_count
        except PowerCut:
            pass
        finally:
            disk.detach()
            history.close()
        return history, disk, first_call, returned

    reference, disk, _, _ = run(str(tmp_path / "reference.dobbin"), 0)
    spans = layout(reference.path)
    assert spans[-1].status == b"X", "the commit was not followed by a checkpoint"
    images = wrong = 0
    problems = []
    for cut_at in range(1, disk.calls + 1):
        path = str(tmp_path / ("cut-%d.dobbin" % cut_at))
        _, disk_then, _, returned = run(path, cut_at)
        data = read(path)
        image_path = path + ".image"
        start = disk_then.synced - disk_then.synced % PAGE
        for page in range(start, len(data), PAGE):
            hole_start, hole_end = max(page, disk_then.synced), min(page + PAGE, len(data))
            write(image_path, data[:hole_start] + bytes(hole_end - hole_start) + data[hole_end:])
            images += 1
            try:
                opened = open_state(image_path)
            except OpenError as error:
                found = str(error)
            else:
                found = None
                if opened.tx_count < returned:
                    found = "lost commit %d" % returned
                elif opened.state != reference.states.get(opened.tx_count):
                    found = "the state is not transaction %d's" % opened.tx_count
            remove_saved_tails(image_path)
            if found is not None:
                wrong += 1
                problems.append("power cut at call %d, page at %d missing: %s"
                                % (cut_at, page, found))
    figures("R3 checkpoint ordering", io_calls=disk.calls, images_opened=images, wrong=wrong)
    assert not wrong, "\n".join(problems[:10])


class SharedDisk:
    """Disk for a log that several threads write to at once.

    The I/O itself runs unlocked (group commit overlaps writes and
    fsyncs); the count, the cut and what was synced are kept under a
    lock.  At the cut the file's bytes, what was synced and which commits
    had returned are taken; from then on every call fails.
    """

    def __init__(self, log, cut_at, returned):
        self.log = log
        self.cut_at = cut_at
        self.returned = returned
        self.lock = threading.Lock()
        self.calls = 0
        self.synced = log.size()
        self.image = None
        self._write, self._sync = log._write, log._sync
        log._write, log._sync = self.write, self.sync

    def detach(self):
        """As Disk.detach: the log's own I/O back, to close it."""
        self.log._write, self.log._sync = self._write, self._sync

    def _power_goes_now(self):
        with self.lock:
            self.calls += 1
            if self.image is None and self.calls >= self.cut_at:
                self.image = (read(self.log.path), self.synced, list(self.returned))
            return self.image is not None

    def write(self, buffers, offset):
        if self._power_goes_now():
            raise PowerCut()
        self._write(buffers, offset)

    def sync(self):
        if self._power_goes_now():
            raise PowerCut()
        size = self.log.end  # the records written so far; not space reserved after them
        self._sync()
        with self.lock:
            if self.image is None:
                self.synced = max(self.synced, size)


THREADS = 4


def test_a_power_cut_under_concurrent_commits(tmp_path):
    # Threads commit at once, so group commit writes records before the
    # fsync of earlier ones returned (their lag is not 0); then any page
    # not yet synced may be missing.  Each commit sets two objects of its
    # thread to the same number: reopened, they must agree (nothing partly
    # applied) and be at least the last number whose commit returned.
    rng = random.Random(17)
    rounds = images = lost = wrong = 0
    problems = []
    for index in range(scaled(20, 300)):
        path = str(tmp_path / ("round-%d.dobbin" % index))
        db = Database(path, durability="none")
        db.elect(PersistentDict({"%d%s" % (n, half): Progress()
                                 for n in range(THREADS) for half in "ab"}))
        transaction.commit()
        db.close()
        db = Database(path)
        returned = [0] * THREADS
        disk = SharedDisk(db._log, rng.randrange(3, 200), returned)

        def commit_until_the_power_goes(n):
            first, second = db.root["%da" % n], db.root["%db" % n]
            seq = 0
            try:
                while True:
                    seq += 1
                    checkout(first)
                    checkout(second)
                    first.seq = second.seq = seq
                    first.padding = bytes(3000)  # records of a page or so
                    transaction.commit()
                    returned[n] = seq
            except PowerCut:
                pass
            finally:
                transaction.abort()

        threads = [threading.Thread(target=commit_until_the_power_goes, args=(n,))
                   for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive()
        disk.detach()
        db.close()
        rounds += 1
        data, synced, returned = disk.image
        candidates = list(in_order_images(data, synced, rng))
        for page in range(synced - synced % PAGE, len(data), PAGE):
            start, end = max(page, synced), min(page + PAGE, len(data))
            candidates.append(("page at %d missing" % page,
                               data[:start] + bytes(end - start) + data[end:]))
        for name, image in candidates:
            image_path = path + ".image"
            write(image_path, image)
            images += 1
            found = None
            try:
                reopened = Database(image_path, durability="none")
                try:
                    root = reopened.root
                    seqs = [(root["%da" % n].seq, root["%db" % n].seq) for n in range(THREADS)]
                finally:
                    reopened.close()
                    transaction.abort()
            except Exception as error:
                found = "%s: %s" % (type(error).__name__, error)
            else:
                for n, (first, second) in enumerate(seqs):
                    if first != second:
                        found = "thread %d's commit %d/%d partly applied" % (n, first, second)
                    elif first < returned[n]:
                        lost += 1
                        found = "thread %d lost commit %d (has %d)" % (n, returned[n], first)
            remove_saved_tails(image_path)
            if found is not None:
                wrong += 1
                if len(problems) < 10:
                    problems.append("round %d, %s: %s" % (index, name, found))
    figures("R3 power cut, concurrent commits", rounds=rounds, images_opened=images,
            lost_commits=lost, wrong=wrong)
    assert not wrong, "\n".join(problems)
