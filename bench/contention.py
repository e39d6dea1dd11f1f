"""W5: writer processes committing at once, and the updates that survive.

Dobbin's writers each open the database file themselves; ZODB's go
through a ZEO server and Durus's through a Durus server, each started
over a file prepared beforehand and stopped afterwards.  Every commit
adds 1 to one counter, so after the run each counter must hold the
commits made to it: any shortfall is a lost update (and any excess an
update applied twice, which fails the run).  The writers start
together (each says it is ready, then all are released) and the rate is
all commits over the time from the first start to the last finish.
"""

import contextlib
import os

from bench import child, servers
from bench.spec import WRITERS, expect, w5_expected

#: How each system's writers reach the data.
SERVER = {"dobbin": None, "zodb": "zeo", "durus": "durus"}


def run(system, directory, commits, shared, profile=False):
    """Run W5 once; return commits_per_s, lost_updates and retries."""
    module = "workloads_" + system
    path = os.path.join(directory, "w5.db")
    child.run(module, "w5_setup", path=path)
    kind = SERVER[system]
    serving = contextlib.nullcontext(path) if kind is None else servers.serve(kind, path)
    with serving as target:
        writers = [child.start(module, "w5_worker", profile=profile and writer == 0,
                               target=target, writer=writer, commits=commits, shared=shared)
                   for writer in range(WRITERS)]
        try:
            for process in writers:
                child.wait_ready(process)
            for process in writers:
                child.release(process)
            results = [child.finish(process, 3600, "%s W5 writer" % system)
                       for process in writers]
        finally:
            for process in writers:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    counters = child.run(module, "w5_counters", path=path)["counters"]
    expected = w5_expected(commits, shared)
    expect(len(counters) == len(expected), "W5 found %d counters" % len(counters))
    doubled = [(i, got - want) for i, (got, want) in enumerate(zip(counters, expected))
               if got > want]
    expect(not doubled, "W5 applied updates twice (counter, extra): %s" % doubled)
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"commits_per_s": WRITERS * commits / elapsed,
            "lost_updates": sum(want - got for got, want in zip(counters, expected)),
            "retries": sum(r["retries"] for r in results)}
