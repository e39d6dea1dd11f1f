"""Commit outcomes remembered by token, so that a resent commit is answered, not run again.

A client that gets no reply in time sends its request again, on a fresh
socket (broker.transport).  For a commit that first copy may still be
queued or running, or done with its reply lost: running the copy too
would apply the changes twice, or fail it on its own first run's writes.
Each commit carries a random token, as do call and invoke (they may
write too); the server runs one request per (token, request id) and
answers every copy with that one outcome.

Outcomes live in memory, for the last `max_entries` commits and at most
`max_bytes` of replies, and each for at least `keep_seconds`, the longest
a client goes on resending: so that one client's burst of writes cannot
push out the outcome of another client's commit while that client may
still be retrying it.  Past `hard_max_bytes` the replies of those young
outcomes give way, oldest first, to their `Recorded` form (tid and new
oids): a copy is then answered as a recalled one is, never run again.  A server may
die after its commit is durable and before its reply is sent; the copy
then reaches the next server on the address.  So each commit's record
also carries its token (in the transaction's extension, under
`COMMIT_MARK`), and a starting server `recall`s the marks of the latest
commits: a copy of one of those is answered as done, never run again.

An outcome is what the request's client must hear of it: once a request's
transaction committed, its reply says so whatever its size (`commit_reply`
lets a commit's states and `changed` give way; a call's result that cannot
be sent is answered as lost) and every copy gets that reply.
"""

import collections
import threading
import time

from zope.interface import implementer

from broker.exc import EncodeError, ProtocolError
from broker.interfaces import ICommitOutcomes

RUN = "run"
WAIT = "wait"

#: The extension key under which a broker commit records its request.
COMMIT_MARK = "dobbin.broker.commit"

#: Bytes an outcome costs besides its reply (its key, entry and tuple):
#: counted, so that many small replies are bounded in memory too.
ENTRY_COST = 300

#: A commit found in the log (`recall`), or one whose reply gave way to
#: others: its tid (None if it wrote nothing), and (new object number, oid) pairs.
Recorded = collections.namedtuple("Recorded", "tid created")

#: Bytes a `Recorded` outcome costs besides ENTRY_COST, per new object.
CREATED_PAIR_COST = 120

#: An outcome kept: the encoded reply (None once it gave way to its
#: record), when it finished, and its `Recorded` form.
_Done = collections.namedtuple("_Done", "reply finished recorded")

#: Bytes a reply adds to its ok value spliced in (id, srv), at most.
REPLY_HEAD = 32
#: Bytes a commit reply spends on a state besides its record (array, key,
#: bin header), and on a new object's [number, key], at most.
STATE_ENTRY = 40
CREATED_ENTRY = 40
#: Bytes and items of a commit reply besides its "created" and "states",
#: "changed" nil.
COMMIT_REPLY_ROOM = 1024


def ok_value(codec, value):
    """`value` encoded by `codec` as a reply's ok value, which the server
    splices in (broker.states.Record).  EncodeError if it cannot be, or if
    the reply would be over the codec's `max_message`."""
    data = codec.encode(value)
    if len(data) > codec.max_message - REPLY_HEAD:
        raise EncodeError("message of %d bytes exceeds the limit of %d"
                          % (len(data) + REPLY_HEAD, codec.max_message))
    return data


def page_value(codec, items, result_of):
    """The encoded ok value `result_of(head)` for the longest head of list
    `items` that fits in a reply (halving it until it does): a page of a
    mapping too big to send is cut short, and the client reads on from
    there.  EncodeError if even one item does not fit."""
    while True:
        try:
            return ok_value(codec, result_of(items))
        except EncodeError:
            if len(items) <= 1:
                raise
            items = items[:len(items) // 2]


def check_created(count, codec):
    """Raise ProtocolError if a commit creating `count` objects could not
    be answered with `codec` (its reply names each): refused before it runs."""
    most = min((codec.max_message - COMMIT_REPLY_ROOM) // CREATED_ENTRY,
               (codec.max_items - COMMIT_REPLY_ROOM) // 3)
    if count > most:
        raise ProtocolError("a commit creates at most %d objects (its reply names each)"
                            % most)


def commit_reply(result, states, codec):
    """The encoded ok value of the reply to a commit that is stored: map
    `result` ("states" empty) with as many of the (key, record) pairs
    `states` yields as fit, and "changed" nil (the client flushes its
    cache) if even `result` does not fit.  The client loads the states
    left out.  Fails only for a "created" `check_created` refuses."""
    states = list(states)
    result["states"] = [[key, record] for key, record in states]
    try:
        return ok_value(codec, result)  # the usual case: everything fits
    except EncodeError:
        result["states"] = []
    try:
        bare = ok_value(codec, result)
    except EncodeError:
        result["changed"] = None
        bare = ok_value(codec, result)
    # The states' array header grows from 1 byte to at most 5.
    room = codec.max_message - REPLY_HEAD - len(bare) - 4
    kept = result["states"]
    for key, record in states:
        if len(record) + STATE_ENTRY <= room:
            room -= len(record) + STATE_ENTRY
            kept.append([key, record])
    if not kept:
        return bare
    try:
        return ok_value(codec, result)
    except EncodeError:  # past the codec's items (3 a state), not its bytes
        return bare


def commit_mark(token, rid, created):
    """The extension value recording commit request (`token`, `rid`), whose
    new objects `created` (number -> object) are recorded as their oids."""
    return {"token": token.hex(), "rid": rid,
            "created": [[number, obj] for number, obj in created.items()]}


def _recorded_of_mark(mark, tid):
    """((token, rid), Recorded) from a commit mark, or None if it is not one."""
    if type(mark) is not dict:
        return None
    token, rid, created = mark.get("token"), mark.get("rid"), mark.get("created")
    if type(token) is not str or type(rid) is not int or type(created) is not list:
        return None
    pairs = []
    for pair in created:
        if (type(pair) is not list or len(pair) != 2
                or type(pair[0]) is not int or type(pair[1]) is not int):
            return None
        pairs.append((pair[0], pair[1]))
    try:
        return (bytes.fromhex(token), rid), Recorded(tid, pairs)
    except ValueError:
        return None


@implementer(ICommitOutcomes)
class CommitOutcomes:
    """The outcomes of recent commits, by (token, request id)."""

    def __init__(self, max_entries=10000, max_bytes=16 * 1024 * 1024, keep_seconds=60.0,
                 hard_max_bytes=128 * 1024 * 1024, clock=time.monotonic):
        self._lock = threading.Lock()
        self._running = {}  # key -> routing ids of the copies waiting for it
        self._done = collections.OrderedDict()  # key -> _Done, oldest first
        self._recorded = {}  # key -> Recorded, of commits an earlier server ran
        self._bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.keep_seconds = keep_seconds
        self.hard_max_bytes = hard_max_bytes
        self._clock = clock

    def recall(self, transactions):
        """Take the commit marks of `transactions` (`dobbin.meta.TransactionInfo`)."""
        found = {}
        for info in transactions:
            if type(info.extension) is not dict:
                continue  # an earlier version recorded any extension as it was
            recorded = _recorded_of_mark(info.extension.get(COMMIT_MARK), info.tid)
            if recorded is not None:
                found[recorded[0]] = recorded[1]
        with self._lock:
            self._recorded.update(found)

    def start(self, key, routing):
        """RUN if the caller is to run this commit, WAIT if a copy is running
        (`routing` gets its reply), the encoded reply of the finished one, or
        the `Recorded` commit that an earlier server ran (the caller answers
        it, as it would a commit it ran)."""
        with self._lock:
            done = self._done.get(key)
            if done is not None:
                if done.reply is not None:
                    return done.reply
                # Only its record is left: answered as a recalled commit,
                # which finish() remembers anew.
                del self._done[key]
                self._bytes -= _cost(done)
                self._running[key] = []
                return done.recorded
            waiting = self._running.get(key)
            if waiting is not None:
                waiting.append(routing)
                return WAIT
            self._running[key] = []
            return self._recorded.pop(key, RUN)

    def finish(self, key, reply, recorded=None):
        """Remember the encoded `reply` of a request that committed
        (`recorded`, its `Recorded` form; None: it did not, and a copy may
        run); return the routing ids of the copies to answer."""
        with self._lock:
            waiting = self._running.pop(key, [])
            if recorded is None:
                return waiting
            self._keep(key, _Done(reply, self._clock(), recorded))
            return waiting

    def _keep(self, key, outcome):
        """Add `outcome`; forget old ones past the soft bounds, and past the
        hard one keep only the records of young ones (lock held)."""
        done = self._done
        done[key] = outcome
        self._bytes += _cost(outcome)
        kept_since = outcome.finished - self.keep_seconds
        while done and (len(done) > self.max_entries or self._bytes > self.max_bytes):
            oldest = next(iter(done.values()))
            if oldest.finished > kept_since:
                break  # its client may still be resending it
            done.popitem(last=False)
            self._bytes -= _cost(oldest)
        if self._bytes > self.hard_max_bytes:
            self._keep_records_only()
        while done and self._bytes > self.hard_max_bytes:
            self._bytes -= _cost(done.popitem(last=False)[1])

    def _keep_records_only(self):
        """Past the hard bound: replies give way to their records, oldest
        first, until half the bound is used (not again at every finish)."""
        done = self._done
        for key, outcome in done.items():
            if self._bytes <= self.hard_max_bytes // 2:
                return
            if outcome.reply is not None:
                self._bytes -= len(outcome.reply)
                done[key] = outcome._replace(reply=None)

    def abandon(self, key, recorded=None):
        """The request will not run here (the server is stopping, or too
        busy): forget it.  The `Recorded` commit `start` handed out for it,
        if any, stays recorded: a copy must never run it again."""
        with self._lock:
            self._running.pop(key, None)
            if recorded is not None:
                # Counted and bounded again, as the outcome start() took out.
                self._keep(key, _Done(None, self._clock(), recorded))


def _cost(outcome):
    """Bytes an outcome is counted for."""
    reply = 0 if outcome.reply is None else len(outcome.reply)
    return reply + ENTRY_COST + CREATED_PAIR_COST * len(outcome.recorded.created)
