"""Benchmark the broker against ZEO and a raw pyzmq round trip, in one run.

    python bench/bench_broker.py [--objects N] [--samples N] [--commits N] [--clients N]

Needs the "bench" extra (ZODB, ZEO).  Every server runs in its own process
on 127.0.0.1, and stops by itself at the end.  Reports:

  (a) p50/p99 latency of loading one uncached object (broker, ZEO), next to
      the raw pyzmq DEALER/ROUTER round trip of a small message, both
      blocking for the reply and busy-waiting for it first as the broker
      client does for quick reads (broker.transport.SPIN, protocol.QUICK);
  (b) invalidation latency: from one client's commit returning until
      another client, polling with new transactions, sees the new value
      (also with both sides' readers asking the server at each begin, and
      with neither: the broker's abort() and ZEO's default begin both take
      the invalidations already received, without a round trip);
  (c) commits/s of small transactions through the server, with fsync
      durability on both sides (ZODB's FileStorage fsyncs every commit):
      once from a single client, and once from --clients client processes
      committing at the same time (each to its own object, so they never
      conflict), which is where the broker's group commit shows.  The
      reading clients of (a) and (b) are closed by then: ZEO's each run an
      asyncio thread in this process that would take the GIL at every
      invalidation.

The servers run side by side and the measurements take turns (a batch of
loads here, then there; one invalidation each; a block of commits each),
so that a busy machine slows both alike.  It prints figures and ratios
against the targets; it asserts nothing.
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent

# The echo sends and receives with the broker's own frame helpers, as the
# broker's server and client do: pyzmq's *_multipart cost about 6 us more
# a round trip, which would lift the lower bound the client is judged by.
ECHO_SERVER = """
import sys, zmq
from broker.transport import recv_frames, send_frames
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.bind("tcp://127.0.0.1:*")
print(sock.getsockopt(zmq.LAST_ENDPOINT).decode(), flush=True)
while True:
    frames = recv_frames(sock)
    send_frames(sock, frames)
    if frames[-1] == b"quit":
        break
sock.close(0)
ctx.term()
"""


def configure(server):
    """--app hook for the broker server process."""
    import models_for_bench as models
    from dobbin.persistent import PersistentDict
    server.export_class(models.Item)
    server.export_class(models.Holder)
    server.export_class(PersistentDict)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(samples):
    return statistics.median(samples) * 1e6, percentile(samples, 0.99) * 1e6


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    return env


def write_models(directory):
    (pathlib.Path(directory) / "models_for_bench.py").write_text(
        "from persistent import Persistent as ZPersistent\n"
        "from dobbin.persistent import Persistent\n"
        "class Item(Persistent):\n"
        "    def __init__(self, n):\n"
        "        self.name = 'item %d' % n\n"
        "        self.n = n\n"
        "class Holder(Persistent):\n"
        "    def __init__(self, items):\n"
        "        self.items = items\n"
        "        self.counter = 0\n"
        "class ZItem(ZPersistent):\n"
        "    def __init__(self, n):\n"
        "        self.name = 'item %d' % n\n"
        "        self.n = n\n")


# -- the three sides, measured in turns ---------------------------------------------

class RawSide:
    """A raw pyzmq DEALER/ROUTER round trip of a small message, to an echo process."""

    def __init__(self):
        import zmq
        self.process = subprocess.Popen([sys.executable, "-c", ECHO_SERVER],
                                        env=child_env(), stdout=subprocess.PIPE, text=True)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.process.stdout.readline().strip())
        self.payload = [b"", b"DOB1", b"\x84\xa2id\x01\xa2op\xa4load\xa3key\x01\xa2tx\x01"]
        self.round_trips(100)  # warm up

    def round_trips(self, count, spin=0):
        """Seconds of `count` round trips; with `spin`, each busy-waits up
        to that long for the reply before blocking, as the broker client's
        quick requests do (broker.transport.SPIN)."""
        import zmq
        from broker.transport import recv_frames, send_frames
        events, pollin = self.socket.getsockopt, int(zmq.POLLIN)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            send_frames(self.socket, self.payload)
            until = t0 + spin
            while spin and not events(zmq.EVENTS) & pollin and time.perf_counter() < until:
                pass
            recv_frames(self.socket)
            times.append(time.perf_counter() - t0)
        return times

    def close(self):
        self.socket.send_multipart([b"", b"quit"])
        self.socket.recv_multipart()
        self.socket.close(0)
        self.context.term()
        self.process.wait(10)
        self.process.stdout.close()


class BrokerSide:
    """`dobbin serve` on a database of `objects` items (fsync), with a reader and a writer."""

    kind = "broker"

    def __init__(self, workdir, objects):
        import transaction
        import models_for_bench as models
        from broker.client import BrokerClient
        from dobbin.database import Database
        from dobbin.persistent import checkout

        path = os.path.join(workdir, "bench.dobbin")
        db = Database(path, durability="none")
        holder = models.Holder([models.Item(n) for n in range(objects)])
        checkout(holder)
        db.elect(holder)
        transaction.commit()
        db.close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dobbin", "serve", path, "--bind", "tcp://127.0.0.1:*",
             "--app", "bench_broker:configure", "--durability", "fsync"],
            env=child_env(), stdout=subprocess.PIPE, text=True)
        self.address = self.process.stdout.readline().split(" at ")[1].split()[0]
        self.reader = BrokerClient(self.address)
        self.writer = BrokerClient(self.address)
        self.items = self.reader.root.items
        self.target_w, self.target_r = self.writer.root.items[0], self.items[0]
        self.target_r.name

    def loads(self, items):
        times = []
        for item in items:
            t0 = time.perf_counter()
            item.name
            times.append(time.perf_counter() - t0)
        return times

    def invalidation(self, value, round_trip=True):
        """Seconds from the writer's commit returning until the reader sees `value`.

        The reader polls with begin() (a round trip: it sees every commit
        made before it), or without `round_trip` with abort() (it sees the
        commits whose broadcast has arrived, as ZEO's default begin does).
        """
        self.target_w.name = value
        self.writer.commit()
        poll = self.reader.begin if round_trip else self.reader.abort
        t0 = time.perf_counter()
        while True:
            poll()
            if self.target_r.name == value:
                return time.perf_counter() - t0
            time.sleep(0)  # lets the client's own threads in (see ZEOSide.invalidation)

    def commits(self, start, count):
        t0 = time.perf_counter()
        for i in range(start, start + count):
            self.target_w.n = i
            self.writer.commit()
        return time.perf_counter() - t0

    def close_readers(self):
        """Close the reading client: the commits that follow are timed alone."""
        self.reader.close()

    def close(self):
        self.reader.close()
        self.writer.close()
        self.process.terminate()
        self.process.wait(10)
        self.process.stdout.close()


class ZEOSide:
    """A ZEO server on a FileStorage of `objects` items, with a reader and a writer."""

    kind = "zeo"

    def __init__(self, workdir, objects):
        import transaction
        import ZEO
        import models_for_bench as models

        self.server_address, self.stop = ZEO.server(path=os.path.join(workdir, "zeo.fs"),
                                                    threaded=False)
        self.address = "%s:%d" % self.server_address
        db = ZEO.DB(self.server_address)
        with db.transaction() as conn:
            conn.root()["items"] = [models.ZItem(n) for n in range(objects)]
            conn.root()["counter"] = 0
        db.close()
        self.tm_r, self.tm_w = transaction.TransactionManager(), transaction.TransactionManager()
        self.db_r, self.db_w = ZEO.DB(self.server_address), ZEO.DB(self.server_address)
        self.conn_r, self.conn_w = self.db_r.open(self.tm_r), self.db_w.open(self.tm_w)
        self.tm_r.begin()
        self.items = self.conn_r.root()["items"]
        self.target_w, self.target_r = self.conn_w.root()["items"][0], self.items[0]
        self.target_r.name
        # A reader whose begin() asks the server, like the broker's.
        self.tm_s = transaction.TransactionManager()
        self.db_s = ZEO.DB(self.server_address, server_sync=True)
        self.conn_s = self.db_s.open(self.tm_s)
        self.tm_s.begin()
        self.target_s = self.conn_s.root()["items"][0]
        self.target_s.name
        self.readers = [self.db_r, self.conn_r, self.db_s, self.conn_s]  # closed right to left

    loads = BrokerSide.loads

    def invalidation(self, value, round_trip=False):
        """Seconds from the writer's commit returning until a reader sees `value`.

        The reader polls with begin(): by default ZEO's begin makes no
        round trip; with `round_trip`, a reader opened with server_sync
        does (it then sees every commit made before, like the broker's).
        """
        self.tm_w.begin()
        self.target_w.name = value
        self.tm_w.commit()
        manager, target = (self.tm_s, self.target_s) if round_trip else (self.tm_r, self.target_r)
        t0 = time.perf_counter()
        while True:
            manager.begin()
            if target.name == value:
                return time.perf_counter() - t0
            # ZEO delivers invalidations on an asyncio thread of this
            # process: a poll that kept the GIL would starve it for up to
            # the 5 ms switch interval (a p99 of 19 ms, ours not ZEO's).
            time.sleep(0)

    def commits(self, start, count):
        t0 = time.perf_counter()
        for i in range(start, start + count):
            self.tm_w.begin()
            self.target_w.n = i
            self.tm_w.commit()
        return time.perf_counter() - t0

    def close_readers(self):
        """Close the reading clients: each has an asyncio thread that takes
        the GIL of this process at every invalidation, and would slow the
        commits that follow (about 25% with one client)."""
        while self.readers:
            self.readers.pop().close()

    def close(self):
        self.close_readers()
        self.conn_w.close()
        self.db_w.close()
        self.stop()


def measure(raw, sides, objects, samples, commits, clients, turns=3):
    """Every figure, taking turns between the sides so that they share the machine's moods."""
    figures = {side.kind: {} for side in sides}
    batch = 50
    from broker.transport import SPIN
    raw_times, spun_times, loads = [], [], {side.kind: [] for side in sides}
    for side in sides:
        side.loads(side.items[:batch])  # warm up: class metadata, sockets
    for start in range(batch, objects, batch):
        raw_times += raw.round_trips(batch)
        spun_times += raw.round_trips(batch, SPIN)
        for side in sides:
            loads[side.kind] += side.loads(side.items[start:start + batch])
    invalidations = {side.kind: [] for side in sides}
    other_invalidations = {side.kind: [] for side in sides}  # the other begin of each
    for i in range(samples):
        for side in sides:
            invalidations[side.kind].append(side.invalidation("v%d" % i))
            other_invalidations[side.kind].append(
                side.invalidation("w%d" % i, round_trip=side.kind == "zeo"))
    for side in sides:
        side.close_readers()
    block = max(1, commits // turns)
    elapsed = {side.kind: 0.0 for side in sides}
    for turn in range(turns):
        for side in sides:
            elapsed[side.kind] += side.commits(turn * block, block)
    spans = {side.kind: [] for side in sides}
    for turn in range(turns):
        for side in sides:
            spans[side.kind].append(concurrent_span(side.kind, side.address, clients, block))
    for side in sides:
        figures[side.kind] = {
            "load": summary(loads[side.kind]),
            "invalidation": summary(invalidations[side.kind]),
            "other invalidation": summary(other_invalidations[side.kind]),
            "rate": turns * block / elapsed[side.kind],
            "concurrent": turns * clients * block / sum(spans[side.kind]),
        }
    return {"raw": summary(raw_times), "spun": summary(spun_times)}, figures


# -- concurrent commits -------------------------------------------------------------

def concurrent_span(kind, address, clients, commits):
    """Seconds for `clients` processes to make `commits` small commits each, all at once."""
    processes = [subprocess.Popen(
        [sys.executable, str(HERE / "bench_broker.py"), "--child", kind, address, str(n + 1),
         str(commits)], env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True) for n in range(clients)]
    try:
        for process in processes:
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a %s client process did not start" % kind)
        for process in processes:  # all connected and warm: start together
            process.stdin.write("go\n")
            process.stdin.flush()
        spans = [tuple(float(t) for t in process.stdout.readline().split())
                 for process in processes]
    finally:
        for process in processes:
            process.stdin.close()
            process.wait(60)
            process.stdout.close()
    return max(end for _s, end in spans) - min(s for s, _e in spans)


def child(kind, address, index, commits):
    """One client process of concurrent_span: commit to items[index] `commits` times."""
    import transaction
    if kind == "broker":
        from broker.client import BrokerClient
        client = BrokerClient(address)
        target = client.root.items[index]
        target.n

        def commit(i):
            target.n = i
            client.commit()

        def close():
            client.close()
    else:
        import ZEO
        host, port = address.rsplit(":", 1)
        db = ZEO.DB((host, int(port)))
        manager = transaction.TransactionManager()
        connection = db.open(manager)
        target = connection.root()["items"][index]
        target.n

        def commit(i):
            manager.begin()
            target.n = i
            manager.commit()

        def close():
            connection.close()
            db.close()
    commit(-1)  # warm up
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()  # system-wide clock: comparable across processes
    for i in range(commits):
        commit(i)
    print("%r %r" % (start, time.monotonic()), flush=True)
    close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--commits", type=int, default=900)
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes for the concurrent commits/s figure")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "ADDRESS", "INDEX", "COMMITS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, address, index, commits = args.child
        return child(kind, address, int(index), int(commits))
    try:
        import ZEO  # noqa: F401
    except ImportError:
        raise SystemExit("bench_broker needs ZODB and ZEO: pip install -e '.[bench]'")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    saved_path = os.environ.get("PYTHONPATH")
    with tempfile.TemporaryDirectory() as workdir:
        write_models(workdir)
        sys.path.insert(0, workdir)
        os.environ["PYTHONPATH"] = os.pathsep.join([workdir, saved_path or ""])
        sides, raw = [], None
        try:
            raw = RawSide()
            sides.append(BrokerSide(workdir, args.objects))
            sides.append(ZEOSide(workdir, args.objects))
            raw_figure, figures = measure(raw, sides, args.objects, args.samples,
                                          args.commits, args.clients)
        finally:
            for side in sides:
                side.close()
            if raw is not None:
                raw.close()
            sys.path.remove(workdir)
            sys.modules.pop("models_for_bench", None)
            if saved_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved_path
    report(args, raw_figure, figures["broker"], figures["zeo"])


def report(args, raw, broker, zeo):
    from broker.transport import SPIN
    print("Broker vs ZEO on 127.0.0.1 (%d objects, %d samples, %d commits, taking turns)"
          % (args.objects, args.samples, args.commits))
    print("%-46s %12s %12s" % ("", "p50 (us)", "p99 (us)"))
    print("%-46s %12.1f %12.1f" % ("raw pyzmq DEALER/ROUTER round trip", *raw["raw"]))
    print("%-46s %12.1f %12.1f" % ("... spinning like the client (%.0f us)" % (SPIN * 1e6),
                                   *raw["spun"]))
    print("%-46s %12.1f %12.1f" % ("(a) uncached load, broker", *broker["load"]))
    print("%-46s %12.1f %12.1f" % ("(a) uncached load, ZEO", *zeo["load"]))
    print("%-46s %12.1f %12.1f" % ("(b) invalidation seen, broker begin()",
                                   *broker["invalidation"]))
    print("%-46s %12.1f %12.1f" % ("(b) invalidation seen, ZEO begin()", *zeo["invalidation"]))
    print("%-46s %12.1f %12.1f" % ("(b) ... ZEO begin(), server_sync=True",
                                   *zeo["other invalidation"]))
    print("%-46s %12.1f %12.1f" % ("(b) ... broker abort() (no round trip)",
                                   *broker["other invalidation"]))
    print("%-46s %12.0f" % ("(c) commits/s, broker (fsync), 1 client", broker["rate"]))
    print("%-46s %12.0f" % ("(c) commits/s, ZEO FileStorage (fsync), 1 client", zeo["rate"]))
    print("%-46s %12.0f" % ("(c) commits/s, broker (fsync), %d clients" % args.clients,
                            broker["concurrent"]))
    print("%-46s %12.0f" % ("(c) commits/s, ZEO FileStorage (fsync), %d clients" % args.clients,
                            zeo["concurrent"]))
    print()
    print("Ratios (target in brackets):")

    def ratio(label, value, target=""):
        print(("  %-40s %5.2f  %s" % (label, value, target)).rstrip())

    # Judged against the raw round trip that waits for its reply as the
    # client does (spinning first): the blocking one pays a second wake-up.
    ratio("(a) broker load / raw, spinning alike", broker["load"][0] / raw["spun"][0],
          "[<= 1.3]")
    ratio("    ... / raw, blocking", broker["load"][0] / raw["raw"][0])
    ratio("(a) broker load / ZEO load", broker["load"][0] / zeo["load"][0], "[<= 0.5]")
    ratio("(b) broker / ZEO invalidation", broker["invalidation"][0] / zeo["invalidation"][0],
          "[<= 0.5]")
    ratio("    both asking the server at begin",
          broker["invalidation"][0] / zeo["other invalidation"][0])
    ratio("    neither asking (abort / begin)",
          broker["other invalidation"][0] / zeo["invalidation"][0])
    ratio("(c) broker / ZEO commits/s, 1 client", broker["rate"] / zeo["rate"], "[>= 3]")
    ratio("(c) broker / ZEO commits/s, %d clients" % args.clients,
          broker["concurrent"] / zeo["concurrent"], "[>= 3]")

if __name__ == "__main__":
    main()
