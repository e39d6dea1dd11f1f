"""R2: the rest of a partly written last commit holds garbage.

After a crash the file may be as long as the whole last record while
only its beginning was written: the rest reads as zeros, as random
bytes, or as stale bytes (here: bytes of an older record of the same
file, so whole valid-looking records may sit in the tail).  The two
families are tested apart: unwritten bytes (zeros, random) and stale
bytes.  Opening
must neither accept the torn commit (false accept) nor refuse the
commits before it (valid commit rejected).
"""

import os
import random

import pytest

from dobbin.log import TX_HEADER_SIZE

from .conftest import (FULL, History, OpenError, figures, layout, open_state, read,
                       remove_saved_tails, write)

BLOCK = 4096


def build(path, monkeypatch):
    # Small checkpoints, so that older checkpoint records exist to go stale.
    monkeypatch.setattr("dobbin.database.CHECKPOINT_MIN_BYTES", 1024)
    history = History(path, seed=3)
    history.commit()
    steps = [history.set_key, history.add_items, history.update_item, history.delete_key,
             lambda: history.set_key(200)]
    while history.db.tx_count < 40:
        history.random.choice(steps)()
    history.add_items(2, 100)
    history.close()
    return history


def fills(data, spans, last, split, rng, family):
    """(mode, tail) pairs: what may follow the first `split` bytes."""
    length = last.end - split
    if family == "unwritten":
        yield "zeros", bytes(length)
        yield "random", rng.randbytes(length)
        rounded = -(-last.end // BLOCK) * BLOCK
        yield "zeros to a block boundary", bytes(rounded - split)
        return
    older = [span for span in spans if span.end <= last.offset]
    checkpoints = [span for span in older if span.status == b"X"]
    commits = [span for span in older if span.status == b"C"]
    sources = [("checkpoint", checkpoints[-1]), ("first commit", commits[0]),
               ("commit", commits[len(commits) // 2])]
    if FULL:
        sources += [("checkpoint", span) for span in checkpoints[:-1]]
        sources += [("commit", span) for span in rng.sample(commits, min(10, len(commits)))]
    for name, span in sources:
        # The same offsets of an older stretch of the file...
        start = span.offset + (split - last.offset)
        stale = data[start:start + length]
        yield "stale bytes under a %s" % name, stale + bytes(length - len(stale))
        # ...and a whole older record right where the writing stopped.
        record = data[span.offset:span.end]
        yield "a whole stale %s" % name, (record + bytes(length))[:max(length, len(record))]


@pytest.mark.parametrize("family", ["unwritten", "stale"])
def test_garbage_after_a_torn_commit_is_neither_accepted_nor_fatal(tmp_path, scratch_dir,
                                                                   monkeypatch, family):
    source = str(tmp_path / "source.dobbin")
    history = build(source, monkeypatch)
    spans = layout(source)
    last = [span for span in spans if span.status == b"C"][-1]
    data = read(source)[:last.end]
    rng = random.Random(4)
    if FULL:
        splits = range(last.offset, last.end)
    else:
        splits = sorted(set(range(last.offset, last.offset + TX_HEADER_SIZE + 8))
                        | set(range(last.offset, last.end, 13))
                        | set(range(last.end - 20, last.end)))
    work = os.path.join(scratch_dir, "torn.dobbin")
    tested, wrong, problems, modes = 0, 0, [], {}
    for split in splits:
        for mode, tail in fills(data, spans, last, split, rng, family):
            candidate = data[:split] + tail
            whole = candidate[last.offset:last.end] == data[last.offset:last.end]
            tid = last.tid if whole else last.tid - 1
            write(work, candidate)
            tested += 1
            try:
                opened = open_state(work, deep=False)
            except OpenError as error:
                outcome = "valid commits rejected: %s" % error
            else:
                if opened.tx_count != tid:
                    outcome = "opened at transaction %d, expected %d" % (opened.tx_count, tid)
                elif opened.state != history.light[tid]:
                    outcome = "wrong state at transaction %d" % tid
                else:
                    outcome = None
            remove_saved_tails(work)
            if outcome is not None:
                wrong += 1
                modes[mode] = modes.get(mode, 0) + 1
                if len(problems) < 12:
                    problems.append("split %d (+%d), %s: %s"
                                    % (split, split - last.offset, mode, outcome))
    figures("R2 torn tail, %s bytes" % family, splits=len(splits), cases_tested=tested,
            wrong=wrong, record_bytes=last.end - last.offset, wrong_by_mode=modes)
    assert not wrong, "%d of %d torn tails opened wrongly (by fill: %r); first ones:\n%s" % (
        wrong, tested, modes, "\n".join(problems))
