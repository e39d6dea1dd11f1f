"""R6: damaged files, opened.

Hypothesis mutates a valid file (flips, inserted and deleted ranges,
patterns written over it, stale copies of its own bytes, truncation)
and opens it, with and without `repair`: the result is the state of
some committed prefix, or a Dobbin error, never another exception, and
within the deadline.

Then every byte of a small file is flipped in turn: opening and reading
everything must raise a Dobbin error or give exactly the right state.
The only bytes whose flip may go unnoticed at open are those the open
does not read (before the newest checkpoint, superseded): those must
show in `Database.verify()`, except inside a checkpoint's body, which is
redundant and skipped by design.
"""

import collections
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dobbin.database import Database
from dobbin.exc import DobbinError

from .conftest import (FULL, History, OpenError, figures, layout, open_state, read,
                       remove_saved_tails, write)

FUZZ_EXAMPLES = 5000 if FULL else 150


def build_small(path, seed, streams=(70,), checkpoints=True):
    """A small file with two checkpoints, a failed record and a stream or two."""
    history = History(path, seed=seed)
    history.BUCKETS = 2
    history.commit()
    history.add_items(2, 20)
    for size in streams:
        history.add_stream(size)
    if checkpoints:
        history.checkpoint()
    history.conflict()
    for step in range(6):
        (history.set_key, history.update_item, history.delete_key)[step % 3]()
        if step == 3 and checkpoints:
            history.checkpoint()
    history.close()
    return history


@pytest.fixture(scope="module")
def fuzz_source():
    directory = tempfile.mkdtemp(prefix="dobbin-fuzz-")
    path = os.path.join(directory, "source.dobbin")
    history = build_small(path, seed=31)
    read_bytes = read(path)
    FUZZ_OUTCOMES.clear()
    yield directory, read(path), history.states
    shutil.rmtree(directory, ignore_errors=True)
    if FUZZ_OUTCOMES:
        wrong = FUZZ_OUTCOMES.pop("wrong", 0)
        figures("R6 fuzzing", file_bytes=len(read_bytes),
                opens=sum(FUZZ_OUTCOMES.values()) + wrong, wrong=wrong,
                **{key.replace(" ", "_"): value for key, value in sorted(FUZZ_OUTCOMES.items())})


PATTERNS = [b"\0", b"\xff", b"DTXR", b"DEND", b"\x89DOBBIN\n", b"C\0\0\0"]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 300)),
    st.tuples(st.just("overwrite"), st.integers(0, 1 << 20), st.sampled_from(PATTERNS),
              st.integers(1, 40)),
    st.tuples(st.just("stale copy"), st.integers(0, 1 << 20), st.integers(1, 600),
              st.integers(0, 1 << 20)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
)


def mutate(data, mutations):
    data = bytearray(data)
    for kind, position, *rest in mutations:
        position %= len(data) + 1
        if kind == "flip" and position < len(data):
            data[position] ^= rest[0]
        elif kind == "insert":
            data[position:position] = rest[0]
        elif kind == "delete":
            del data[position:position + rest[0]]
        elif kind == "overwrite":
            pattern = rest[0] * rest[1]
            data[position:position + len(pattern)] = pattern
        elif kind == "stale copy":
            source = rest[1] % (len(data) + 1)
            data[position:position + rest[0]] = data[source:source + rest[0]]
        elif kind == "truncate":
            del data[position:]
        if not data:
            break
    return bytes(data)


FUZZ_OUTCOMES = collections.Counter()


def outcome(path, states, **options):
    """None if opening `path` gave a committed prefix or a Dobbin error."""
    try:
        opened = open_state(path, **options)
    except OpenError as error:
        if isinstance(error.error, DobbinError):
            FUZZ_OUTCOMES["refused with " + type(error.error).__name__] += 1
            return None
        return "%s (not a Dobbin error)" % error
    if opened.tx_count not in states:
        return "opened at transaction %d, which never existed" % opened.tx_count
    if opened.state != states[opened.tx_count]:
        return "the state is not transaction %d's" % opened.tx_count
    FUZZ_OUTCOMES["whole" if opened.tx_count == max(states) else "a shorter prefix"] += 1
    return None


@settings(max_examples=FUZZ_EXAMPLES, deadline=3000, database=None, derandomize=not FULL,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_a_mutated_file_opens_as_a_prefix_or_raises_a_dobbin_error(fuzz_source, mutations):
    directory, data, states = fuzz_source
    damaged = mutate(data, mutations)
    for repair in (False, True):
        path = os.path.join(directory, "mutated.dobbin")
        write(path, damaged)
        try:
            wrong = outcome(path, states, repair=repair)
        finally:
            remove_saved_tails(path)
            os.remove(path)
        FUZZ_OUTCOMES["wrong"] += wrong is not None
        assert wrong is None, "repair=%s: %s" % (repair, wrong)


# -- every byte flipped ------------------------------------------------------------


def flip_every_byte(directory, history, flips):
    """Flip each byte of the file with each of `flips`; return the figures."""
    source = history.path
    data = read(source)
    spans = layout(source)
    final = spans[-1].tid
    checkpoints = [span for span in spans if span.status == b"X"]
    newest = checkpoints[-1] if checkpoints else None
    path = os.path.join(directory, "flipped.dobbin")
    counts = {"refused": 0, "cut as torn": 0, "checkpoint skipped, shown by verify": 0,
              "unread, shown by verify": 0, "wrong": 0}
    problems = []
    for position in range(len(data)):
        span = next((span for span in spans if span.offset <= position < span.end), None)
        for flip in flips:
            damaged = bytearray(data)
            damaged[position] ^= flip
            write(path, damaged)
            try:
                opened = open_state(path)
            except OpenError as error:
                if isinstance(error.error, DobbinError):
                    counts["refused"] += 1
                    found = None
                else:
                    found = "raised %s" % error
            else:
                found = judge(path, opened, history.states, final, span, spans, newest,
                              counts)
            remove_saved_tails(path)
            if found is not None:
                counts["wrong"] += 1
                if len(problems) < 15:
                    problems.append("byte %d ^ 0x%02x (%s): %s" % (
                        position, flip, "file header" if span is None else
                        "record of tid %d, +%d" % (span.tid, position - span.offset), found))
    return len(data), counts, problems


def judge(path, opened, states, final, span, spans, newest, counts):
    """Classify an open that succeeded; return what is wrong, or None."""
    if opened.tx_count != final or opened.recovery is not None:
        # Only the last record may be cut as a torn tail (nothing valid after it).
        if span is not spans[-1] or opened.recovery is None:
            return "opened at transaction %d (recovery %r), expected %d" % (
                opened.tx_count, opened.recovery, final)
        if opened.state != states[opened.tx_count]:
            return "cut back to transaction %d with a wrong state" % opened.tx_count
        counts["cut as torn"] += 1
        return None
    if opened.state != states[final]:
        return "accepted with a wrong state"
    if span is not None and (newest is None or span.offset >= newest.end):
        return "a flip in a record read at open went unnoticed"
    db = Database(path, read_only=True)
    try:
        report = db.verify()
    finally:
        db.close()
    if report["ok"]:
        return "unnoticed at open and by verify()"
    # A damaged checkpoint is stepped over (it is redundant): only verify() tells.
    in_checkpoint = span is not None and span.status == b"X"
    counts["checkpoint skipped, shown by verify" if in_checkpoint
           else "unread, shown by verify"] += 1
    return None


@pytest.mark.parametrize("checkpoints", [True, False], ids=["checkpoints", "no checkpoint"])
def test_every_flipped_byte_is_refused_or_harmless(tmp_path, checkpoints):
    history = build_small(str(tmp_path / "small.dobbin"), seed=41, checkpoints=checkpoints)
    flips = [1 << bit for bit in range(8)] + [0xFF] if FULL else [0x01]
    size, counts, problems = flip_every_byte(str(tmp_path), history, flips)
    figures("R6 byte flips (%s)" % ("checkpoints" if checkpoints else "no checkpoint"),
            file_bytes=size, flips_tested=size * len(flips), **counts)
    assert size < 4096
    assert not counts["wrong"], "\n".join(problems)


@pytest.mark.skipif(not FULL, reason="DOBBIN_FULL=1 only: a 70 KB file, every byte")
def test_every_flipped_byte_of_a_file_with_a_two_chunk_stream(tmp_path):
    history = build_small(str(tmp_path / "streams.dobbin"), seed=43, streams=(70, 70000))
    size, counts, problems = flip_every_byte(str(tmp_path), history, [0x01])
    figures("R6 byte flips, two-chunk stream", file_bytes=size, flips_tested=size, **counts)
    assert not counts["wrong"], "\n".join(problems)
