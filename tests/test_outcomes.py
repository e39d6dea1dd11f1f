"""broker.outcomes: one run per commit token, every copy answered with its outcome."""

import threading

import msgpack

from zope.interface.verify import verifyObject

import pytest

from broker.codec import Codec
from broker.exc import EncodeError, ProtocolError
from broker.interfaces import ICommitOutcomes
from broker.keys import Key
from broker import outcomes as outcomes_module
from broker.outcomes import (COMMIT_MARK, ENTRY_COST, REPLY_HEAD, RUN, WAIT, CommitOutcomes,
                             Recorded, check_created, commit_mark, commit_reply, ok_value,
                             page_value)
from dobbin.meta import TransactionInfo


#: The record of a request that committed: finish() remembers its outcome.
DONE = Recorded(7, [])


def info(tid, extension):
    return TransactionInfo(tid, 0.0, "", "", extension)


def test_implements_interface():
    assert verifyObject(ICommitOutcomes, CommitOutcomes())


def test_the_first_copy_runs_later_ones_wait_then_get_its_reply():
    outcomes = CommitOutcomes()
    key = (b"t" * 16, 7)
    assert outcomes.start(key, b"first") is RUN
    assert outcomes.start(key, b"second") is WAIT
    assert outcomes.start(key, b"third") is WAIT
    assert outcomes.finish(key, b"reply", DONE) == [b"second", b"third"]
    assert outcomes.start(key, b"fourth") == b"reply"
    assert outcomes.start((b"t" * 16, 8), b"other id") is RUN


def test_an_outcome_not_remembered_still_answers_the_waiting_copies():
    outcomes = CommitOutcomes()
    key = (b"f" * 16, 1)
    assert outcomes.start(key, b"first") is RUN
    assert outcomes.start(key, b"second") is WAIT
    assert outcomes.finish(key, b"error reply") == [b"second"]
    assert outcomes.start(key, b"later copy") is RUN


def test_old_outcomes_go_by_count_and_by_bytes(monkeypatch):
    monkeypatch.setattr(outcomes_module, "ENTRY_COST", 0)  # replies alone, here
    outcomes = CommitOutcomes(max_entries=3, max_bytes=100, keep_seconds=0)
    for n in range(5):
        assert outcomes.start(n, b"r") is RUN
        outcomes.finish(n, b"x" * 10, DONE)
    assert [outcomes.start(n, b"r") for n in range(5)][2:] == [b"x" * 10] * 3
    assert outcomes.start(0, b"r") is WAIT  # forgotten, so started again just above
    outcomes.finish(0, b"y" * 60, DONE)
    outcomes.finish(1, b"z" * 60, DONE)  # 120 bytes: the older one goes
    assert outcomes.start(1, b"r") == b"z" * 60
    assert outcomes.start(0, b"r") is RUN


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_recent_outcomes_stay_past_the_count_and_bytes_up_to_the_hard_bound(monkeypatch):
    monkeypatch.setattr(outcomes_module, "ENTRY_COST", 0)
    clock = Clock()
    outcomes = CommitOutcomes(max_entries=2, max_bytes=30, keep_seconds=10,
                              hard_max_bytes=100, clock=clock)
    for n in range(6):
        outcomes.start(n, b"r")
        outcomes.finish(n, b"x" * 10, DONE)
        clock.now += 1
    # 6 entries, 60 bytes: over the count and the bytes, all younger than 10 s.
    assert [outcomes.start(n, b"r") for n in range(6)] == [b"x" * 10] * 6
    clock.now = 14.5  # entries 0..4 are older than 10 s now
    outcomes.start(6, b"r")
    outcomes.finish(6, b"y", DONE)
    assert [outcomes.start(n, b"r") for n in range(4)] == [RUN] * 4
    assert outcomes.start(5, b"r") == b"x" * 10
    for n in range(4):
        outcomes.abandon(n)
    # Past the hard bound, young outcomes keep only their records, oldest
    # first: a copy is handed the record to answer, as a recalled one.
    outcomes.start(7, b"r")
    outcomes.finish(7, b"z" * 95, Recorded(9, []))
    assert outcomes.start(5, b"r") == DONE
    assert outcomes.start(5, b"copy") is WAIT
    assert outcomes.finish(5, b"answer", DONE) == [b"copy"]
    assert outcomes.start(5, b"r") == b"answer"


def test_young_outcomes_go_only_when_their_records_pass_the_hard_bound(monkeypatch):
    monkeypatch.setattr(outcomes_module, "ENTRY_COST", 10)
    monkeypatch.setattr(outcomes_module, "CREATED_PAIR_COST", 0)

    def finished(count):
        outcomes = CommitOutcomes(max_entries=1, max_bytes=0, keep_seconds=10,
                                  hard_max_bytes=100, clock=Clock())
        for n in range(count):
            outcomes.start(n, b"r")
            outcomes.finish(n, b"x" * 40, Recorded(n, []))
        return outcomes

    # 50 bytes each: the third passed the bound, and replies gave way,
    # oldest first, until half the bound was used.
    outcomes = finished(4)
    assert outcomes.start(3, b"r") == b"x" * 40
    assert outcomes.start(0, b"r") == Recorded(0, [])
    # Records of 10 bytes: the eleventh passed the bound, and the oldest went.
    outcomes = finished(12)
    assert [outcomes.start(n, b"r") for n in range(3)] == [RUN, RUN, Recorded(2, [])]


def test_old_outcomes_go_before_young_replies_give_way(monkeypatch):
    monkeypatch.setattr(outcomes_module, "ENTRY_COST", 0)
    clock = Clock()
    outcomes = CommitOutcomes(max_entries=1, max_bytes=0, keep_seconds=10,
                              hard_max_bytes=100, clock=clock)
    outcomes.start("old", b"r")
    outcomes.finish("old", b"o" * 60, DONE)
    clock.now = 20
    outcomes.start("young", b"r")
    outcomes.finish("young", b"y" * 60, DONE)  # 120 bytes, but "old" may go
    assert outcomes.start("young", b"r") == b"y" * 60
    assert outcomes.start("old", b"r") is RUN


def test_a_record_handed_out_and_abandoned_is_counted_again(monkeypatch):
    monkeypatch.setattr(outcomes_module, "ENTRY_COST", 10)
    monkeypatch.setattr(outcomes_module, "CREATED_PAIR_COST", 0)
    outcomes = CommitOutcomes(max_entries=1, max_bytes=0, keep_seconds=10,
                              hard_max_bytes=30, clock=Clock())
    outcomes.start("a", b"r")
    outcomes.finish("a", b"x" * 40, Recorded(1, []))  # past the bound: its record only
    recorded = outcomes.start("a", b"copy")
    assert recorded == Recorded(1, [])
    outcomes.abandon("a", recorded)  # refused Busy, say
    assert outcomes.start("a", b"next copy") == recorded
    outcomes.abandon("a", recorded)
    for key in "bcd":  # records of 10 bytes: the fourth passes the bound
        outcomes.start(key, b"r")
        outcomes.finish(key, b"", Recorded(2, []))
    assert outcomes.start("a", b"r") is RUN


def test_a_commit_whose_reply_gave_way_is_never_run_again(monkeypatch):
    # Another client's big commits pushed a small outcome out within a
    # second: its copy ran again and was answered ConflictError.
    clock = Clock()
    outcomes = CommitOutcomes(keep_seconds=60, hard_max_bytes=10 * 1024 * 1024, clock=clock)
    small = (b"s" * 16, 1)
    outcomes.start(small, b"a")
    outcomes.finish(small, b"ok", Recorded(3, [(1, 8)]))
    for n in range(20):
        clock.now += 0.04
        outcomes.start((b"b" * 16, n), b"b")
        outcomes.finish((b"b" * 16, n), b"q" * 1024 * 1024, Recorded(4 + n, []))
    assert outcomes.start(small, b"copy") == Recorded(3, [(1, 8)])


def test_each_outcome_costs_more_than_its_reply():
    # Counted by their replies alone, a minute of 31-byte outcomes could
    # reach the hard bound only at 1.5 GB of memory.
    outcomes = CommitOutcomes(max_bytes=10 * ENTRY_COST, keep_seconds=0)
    for n in range(100):
        outcomes.start(n, b"r")
        outcomes.finish(n, b"x", DONE)
    kept = [n for n in range(100) if outcomes.start(n, b"r") == b"x"]
    assert kept == list(range(91, 100))


def test_an_abandoned_commit_runs_when_sent_again():
    outcomes = CommitOutcomes()
    assert outcomes.start("k", b"a") is RUN
    outcomes.abandon("k")
    assert outcomes.start("k", b"b") is RUN


def test_an_abandoned_recalled_commit_stays_recorded():
    # A copy refused as Busy once lost its record: the next copy ran it again.
    token = bytes(range(16))
    outcomes = CommitOutcomes()
    outcomes.recall([info(40, {COMMIT_MARK: commit_mark(token, 5, {})})])
    recorded = outcomes.start((token, 5), b"copy")
    assert recorded == Recorded(40, [])
    outcomes.abandon((token, 5), recorded)
    assert outcomes.start((token, 5), b"next copy") == recorded


def test_one_run_among_threads():
    outcomes = CommitOutcomes()
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(outcomes.start("k", n)))
               for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(RUN) == 1 and results.count(WAIT) == 7


def test_a_recalled_commit_is_handed_out_once_then_answered_as_finished():
    token = bytes(range(16))
    mark = commit_mark(token, 5, {1: 9, 2: 12})
    assert mark == {"token": token.hex(), "rid": 5, "created": [[1, 9], [2, 12]]}
    outcomes = CommitOutcomes()
    outcomes.recall([info(40, {COMMIT_MARK: mark}), info(39, {"other": 1}), info(38, {})])
    assert outcomes.start((token, 6), b"another request id") is RUN
    assert outcomes.start((token, 5), b"copy") == Recorded(40, [(1, 9), (2, 12)])
    assert outcomes.start((token, 5), b"second copy") is WAIT
    assert outcomes.finish((token, 5), b"reply", DONE) == [b"second copy"]
    assert outcomes.start((token, 5), b"third copy") == b"reply"


def test_malformed_commit_marks_are_ignored():
    good = commit_mark(b"t" * 16, 1, {})
    bad_marks = [None, "x", [], {}, dict(good, token=7), dict(good, token="zz"),
                 dict(good, rid="1"), dict(good, created={}), dict(good, created=[[1]]),
                 dict(good, created=[[1, "9"]]), dict(good, created=[5])]
    outcomes = CommitOutcomes()
    outcomes.recall([info(n, {COMMIT_MARK: mark}) for n, mark in enumerate(bad_marks)])
    # An extension that is not a mapping (an earlier version recorded one) too.
    outcomes.recall([info(20, ["not", "a", "mapping"]), info(21, "x")])
    assert outcomes.start((b"t" * 16, 1), b"r") is RUN


def commit_result(changed=(), created=0):
    return {"tid": 9, "created": [[n, Key("o", n, bytes(16))] for n in range(created)],
            "changed": list(changed), "root": Key("o", 1, bytes(16)), "states": []}


def states(*sizes):
    return iter([(Key("o", n, bytes(16)), b"r" * size) for n, size in enumerate(sizes)])


def test_a_commit_reply_keeps_the_states_that_fit_and_always_encodes():
    codec = Codec(max_message=2000)
    data = commit_reply(commit_result([5, 6]), states(900, 2000, 700, 300), codec)
    reply = codec.decode(data)
    assert [len(record) for _key, record in reply["states"]] == [900, 700]
    assert reply["changed"] == [5, 6] and len(data) <= 2000 - REPLY_HEAD
    # Too many oids changed to name: the client is told to flush instead.
    reply = codec.decode(commit_reply(commit_result(range(2 ** 40, 2 ** 40 + 300)),
                                      states(100), codec))
    assert reply["changed"] is None and len(reply["states"]) == 1
    # States past the codec's items: none sent, the client loads them.
    codec = Codec(max_message=10000, max_items=60)
    reply = codec.decode(commit_reply(commit_result(), states(*[1] * 30), codec))
    assert reply["states"] == [] and reply["tid"] == 9


def test_ok_values_leave_room_for_the_reply_around_them():
    codec = Codec(max_message=1000)
    assert codec.decode(ok_value(codec, "x" * 900)) == "x" * 900
    with pytest.raises(EncodeError, match="exceeds the limit of 1000"):
        ok_value(codec, "x" * (1000 - REPLY_HEAD))


def test_a_commit_creating_more_than_its_reply_can_name_is_refused():
    codec = Codec(max_message=5024)
    check_created(100, codec)
    with pytest.raises(ProtocolError, match="creates at most 100 objects"):
        check_created(101, codec)
    commit_reply(commit_result(range(100), created=100), states(), codec)  # it fits
    codec = Codec(max_items=1324)
    with pytest.raises(ProtocolError, match="creates at most 100 objects"):
        check_created(101, codec)
    commit_reply(commit_result(created=100), states(), codec)


def test_a_page_too_big_to_send_is_cut_short():
    codec = Codec(max_message=1000)
    items = [b"x" * 300] * 5

    def result_of(head):
        return {"items": head, "more": len(head) < len(items)}
    page = msgpack.unpackb(page_value(codec, items, result_of))
    assert 1 <= len(page["items"]) < 5 and page["more"]
    assert len(msgpack.unpackb(page_value(codec, items[:2], result_of))["items"]) == 2
    with pytest.raises(EncodeError):
        page_value(codec, [b"x" * 2000], result_of)
