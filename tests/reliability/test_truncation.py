"""R1: a file cut short at any byte opens as its last whole commit.

A crash can leave the file ending anywhere.  Whatever the cut, opening
must show exactly the state after the last commit that ends at or
before it (and count exactly its transactions), cut the file back to
that record's end, and keep the cut bytes beside the file in
``PATH.torn-*``.  CI tests every offset of the last three commits and a
sample elsewhere; DOBBIN_FULL=1 tests every offset of the file.
"""

import concurrent.futures
import io
import multiprocessing
import os
import random
import time

import transaction

from dobbin.database import Database
from dobbin.log import ENTRY_SIZE, FILE_HEADER_SIZE, STREAM_CHUNK, TX_HEADER_SIZE
from dobbin.persistent import PersistentFile

from .conftest import (FULL, History, OpenError, build_history, expected_at, figures, key_history,
                       layout, open_state, read, remove_saved_tails, saved_tails)

COMMITS = 200
MAX_REPORTED = 20


def _set_length(work, data, cut):
    """Make the work file data[:cut]; it always holds a prefix of data."""
    size = os.path.getsize(work) if os.path.exists(work) else 0
    if size > cut:
        os.truncate(work, cut)
    elif size < cut:
        with open(work, "r+b" if size else "wb") as f:
            f.seek(size)
            f.write(data[size:cut])


def check_cut(work, data, spans, states, cut):
    """Open `work` cut at `cut`; return what was wrong (empty: nothing)."""
    _set_length(work, data, cut)
    tid, end = expected_at(spans, cut)
    problems = []
    try:
        opened = open_state(work, deep=False)
    except OpenError as error:
        os.truncate(work, 0)  # whatever it did, start the next cut afresh
        remove_saved_tails(work)
        return ["cut %d (expected transaction %d): %s" % (cut, tid, error)]
    if opened.tx_count != tid:
        problems.append("cut %d: opened at transaction %d, expected %d"
                        % (cut, opened.tx_count, tid))
    elif opened.state != states[tid]:
        problems.append("cut %d: the state differs from transaction %d's" % (cut, tid))
    tails = saved_tails(work)
    if cut == end:
        if tails or opened.recovery:
            problems.append("cut %d is a record boundary, yet recovery cut %r"
                            % (cut, opened.recovery))
    else:
        if len(tails) != 1 or not tails[0].startswith(work + ".torn-"):
            problems.append("cut %d: expected one PATH.torn-* file, found %r" % (cut, tails))
        elif read(tails[0]) != data[end:cut]:
            problems.append("cut %d: the saved tail is not the cut bytes %d..%d"
                            % (cut, end, cut))
        recovery = opened.recovery or {}
        if recovery.get("offset") != end or recovery.get("bytes") != cut - end:
            problems.append("cut %d: recovery reported %r, expected offset %d, %d bytes"
                            % (cut, opened.recovery, end, cut - end))
    size = os.path.getsize(work)
    if size != end:
        problems.append("cut %d: file left at %d bytes, expected %d" % (cut, size, end))
        os.truncate(work, 0)
    remove_saved_tails(work)
    return problems


def run_cuts(work, data, spans, states, cuts):
    """Check every cut (largest first); return (count, problems)."""
    problems = []
    count = 0
    for cut in sorted(cuts, reverse=True):
        found = check_cut(work, data, spans, states, cut)
        count += 1
        if found:
            problems.append(found[0] if len(problems) < MAX_REPORTED else None)
    return count, problems


def _run_cuts_in_worker(arguments):
    work, source, spans, states, cuts = arguments
    return run_cuts(work, read(source), spans, states, cuts)


def check_all(scratch_dir, source, spans, states, cuts):
    """run_cuts, spread over the cores in full mode."""
    data = read(source)
    workers = min(os.cpu_count() or 1, 4) if FULL else 1
    cuts = sorted(cuts)
    if workers == 1:
        return run_cuts(os.path.join(scratch_dir, "cut.dobbin"), data, spans, states, cuts)
    shares = [cuts[index::workers] for index in range(workers)]
    jobs = [(os.path.join(scratch_dir, "cut-%d.dobbin" % index), source, spans, states, share)
            for index, share in enumerate(shares)]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        results = list(pool.map(_run_cuts_in_worker, jobs))
    return sum(count for count, _ in results), [p for _, found in results for p in found]


def sample_cuts(spans, size, rng):
    """Every offset of the last three commits, edges, and a random sample."""
    commits = [span for span in spans if span.status != b"X"]
    cuts = set(range(commits[-3].offset, size + 1))
    for span in spans:
        cuts.update((span.offset - 1, span.offset, span.offset + 1, span.offset + 5,
                     span.offset + TX_HEADER_SIZE, span.end - 1, span.end))
        if span.end - span.offset > STREAM_CHUNK:
            data_start = span.offset + TX_HEADER_SIZE + ENTRY_SIZE
            for chunk in range(data_start, span.end, STREAM_CHUNK):
                cuts.update((chunk - 1, chunk, chunk + 1))
    for edge in range(1 << 16, size, 1 << 16):
        cuts.update((edge - 1, edge, edge + 1))
    cuts.update(rng.sample(range(FILE_HEADER_SIZE, size), 400))
    return {cut for cut in cuts if FILE_HEADER_SIZE <= cut <= size}


def test_a_cut_anywhere_opens_as_the_last_whole_commit(tmp_path, scratch_dir):
    source = str(tmp_path / "source.dobbin")
    history = build_history(source, COMMITS, seed=1)
    spans = layout(source)
    size = os.path.getsize(source)
    assert size > (2 << 20) and any(span.end - span.offset > (1 << 20) for span in spans)
    if FULL:
        cuts = set(range(FILE_HEADER_SIZE, size + 1))
    else:
        cuts = sample_cuts(spans, size, random.Random(1))
    started = time.monotonic()
    count, problems = check_all(scratch_dir, source, spans, history.light, cuts)
    figures("R1 truncation", file_bytes=size, records=len(spans),
            transactions=len(history.states) - 1,
            checkpoints=sum(span.status == b"X" for span in spans), offsets_tested=count,
            wrong=len(problems), seconds=round(time.monotonic() - started, 1))
    assert not problems, "%d of %d cuts went wrong, first ones:\n%s" % (
        len(problems), count, "\n".join(p for p in problems if p))


def test_a_cut_inside_the_file_header_opens_as_a_new_database(tmp_path):
    # Only a crash while the file is being created leaves fewer than 64
    # bytes: no transaction can be in it, so it must open empty.
    source = str(tmp_path / "source.dobbin")
    Database(source).close()
    data = read(source)
    work = str(tmp_path / "cut.dobbin")
    problems = []
    for cut in range(FILE_HEADER_SIZE):
        _set_length(work, data, cut)
        try:
            opened = open_state(work)
        except Exception as error:
            problems.append("cut %d: %s: %s" % (cut, type(error).__name__, error))
        else:
            tails = saved_tails(work)
            if opened.tx_count != 0 or opened.state is not None:
                problems.append("cut %d: opened with %d transactions" % (cut, opened.tx_count))
            elif cut and (len(tails) != 1 or read(tails[0]) != data[:cut]):
                problems.append("cut %d: the torn header was not kept beside the file (%r)"
                                % (cut, tails))
        os.truncate(work, 0)
        remove_saved_tails(work)
    figures("R1 header cuts", offsets_tested=FILE_HEADER_SIZE, wrong=len(problems))
    assert not problems, "\n".join(problems[:10])


def test_a_cut_inside_a_stream_holding_a_dobbin_file(tmp_path, scratch_dir, monkeypatch):
    # Stream bytes may look exactly like records (a backup of a Dobbin
    # file stored in a Dobbin file): they must never be taken for ours.
    monkeypatch.setattr("dobbin.database.CHECKPOINT_MIN_BYTES", 2048)
    inner = str(tmp_path / "inner.dobbin")
    key_history(inner, seed=5, commits=60, size=200)
    inner_bytes = read(inner)
    inner_spans = layout(inner)
    assert any(span.status == b"X" for span in inner_spans), "the inner file has no checkpoint"

    source = str(tmp_path / "source.dobbin")
    history = History(source, seed=6)
    history.commit()
    history.set_key()
    history.commit(lambda bucket: bucket.__setitem__("backup",
                                                     PersistentFile(io.BytesIO(inner_bytes))))
    history.set_key()
    history.close()
    spans = layout(source)
    stored = [span for span in spans if span.end - span.offset > len(inner_bytes)][0]
    data_start = stored.offset + TX_HEADER_SIZE + ENTRY_SIZE
    if FULL:
        cuts = set(range(stored.offset, stored.end + 1))
    else:
        # Right after each inner record (a clean-looking end), and a sample.
        cuts = {data_start + span.end + delta for span in inner_spans for delta in (0, 1, 20)}
        cuts.update(random.Random(2).sample(range(stored.offset, stored.end), 100))
    count, problems = check_all(scratch_dir, source, spans, history.light, cuts)
    figures("R1 stream holding a Dobbin file", offsets_tested=count, wrong=len(problems),
            inner_checkpoints=sum(span.status == b"X" for span in inner_spans))
    assert not problems, "%d of %d cuts went wrong, first ones:\n%s" % (
        len(problems), count, "\n".join(p for p in problems if p))
    transaction.abort()
