"""broker.history: the oids each recent transaction changed, bounded."""

import threading

from zope.interface.verify import verifyObject

from broker.history import InvalidationHistory
from broker.interfaces import IInvalidationHistory


def test_invalidation_history_provides_its_interface():
    assert verifyObject(IInvalidationHistory, InvalidationHistory(0))


def test_history():
    history = InvalidationHistory(10, size=3)
    assert history.changes(10, 10) == []
    assert history.changes(9, 12) is None and history.changes(None, 12) is None
    history.add(12, frozenset({1}))
    history.add(13, frozenset({2, 1}))
    history.add(13, frozenset({99}))  # duplicate notification ignored
    assert history.changes(10, 13) == [1, 2]
    assert history.changes(12, 13) == [1, 2]
    assert history.changes(12, 12) == []
    history.add(15, frozenset({3}))
    history.add(16, frozenset({4}))
    assert history.floor == 12
    assert history.changes(11, 16) is None
    assert history.changes(12, 16) == [1, 2, 3, 4]


def test_history_holds_a_bounded_number_of_oids():
    history = InvalidationHistory(0, size=100, max_oids=10)
    history.add(1, frozenset(range(4)))
    history.add(2, frozenset(range(4, 8)))
    history.add(3, frozenset(range(8, 12)))  # 12 oids: the first transaction goes
    assert history.floor == 1 and history.changes(1, 3) == list(range(4, 12))
    assert history.changes(0, 3) is None  # a client that far behind flushes
    history.add(4, frozenset(range(100, 120)))  # alone over the bound: nothing is kept
    assert history.floor == history.top == 4 and history.changes(3, 4) is None
    assert history.changes(4, 4) == []


def test_adds_from_several_threads_keep_every_transaction():
    history = InvalidationHistory(0, size=100000)
    tids = iter(range(1, 4001))
    lock = threading.Lock()

    def feed():
        while True:
            with lock:  # callbacks come in tid order, from any thread
                tid = next(tids, None)
                if tid is None:
                    return
                history.add(tid, frozenset({tid % 7}))

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert history.top == 4000 and history.floor == 0
    assert history.changes(0, 4000) == list(range(7))
    assert history.changes(3999, 4000) == [4000 % 7]
