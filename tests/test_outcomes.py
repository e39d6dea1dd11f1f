"""broker.outcomes: one run per commit token, every copy answered with its outcome."""

import threading

from zope.interface.verify import verifyObject

from broker.interfaces import ICommitOutcomes
from broker.outcomes import RUN, WAIT, CommitOutcomes


def test_implements_interface():
    assert verifyObject(ICommitOutcomes, CommitOutcomes())


def test_the_first_copy_runs_later_ones_wait_then_get_its_reply():
    outcomes = CommitOutcomes()
    key = (b"t" * 16, 7)
    assert outcomes.start(key, b"first") is RUN
    assert outcomes.start(key, b"second") is WAIT
    assert outcomes.start(key, b"third") is WAIT
    assert outcomes.finish(key, b"reply") == [b"second", b"third"]
    assert outcomes.start(key, b"fourth") == b"reply"
    assert outcomes.start((b"t" * 16, 8), b"other id") is RUN


def test_old_outcomes_go_by_count_and_by_bytes():
    outcomes = CommitOutcomes(max_entries=3, max_bytes=100)
    for n in range(5):
        assert outcomes.start(n, b"r") is RUN
        outcomes.finish(n, b"x" * 10)
    assert [outcomes.start(n, b"r") for n in range(5)][2:] == [b"x" * 10] * 3
    assert outcomes.start(0, b"r") is WAIT  # forgotten, so started again just above
    outcomes.finish(0, b"y" * 60)
    outcomes.finish(1, b"z" * 60)  # 120 bytes: the older one goes
    assert outcomes.start(1, b"r") == b"z" * 60
    assert outcomes.start(0, b"r") is RUN


def test_an_abandoned_commit_runs_when_sent_again():
    outcomes = CommitOutcomes()
    assert outcomes.start("k", b"a") is RUN
    outcomes.abandon("k")
    assert outcomes.start("k", b"b") is RUN


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
