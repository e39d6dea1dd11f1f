"""What every system runs: the object shape, the sizes, the clock, RSS.

The `workloads_*` modules implement one function per workload over this
specification; keeping the shape and the sizes here is what makes the
three implementations the same workload.
"""

import resource
import time

#: W1 and W4 cycle over this many items, one changed per commit.
CYCLED_ITEMS = 100
#: W5: objects each writer process changes, round robin.
CONTENDED_OBJECTS = 10
#: W5: writer processes.
WRITERS = 2

#: Sizes per mode.  "tiny" is for the test suite only.
SIZES = {
    "default": {
        "w1_commits": 2000,
        "w2_objects": 100_000,
        "w4_transactions": 10_000,
        "w5_commits": 500,
        "w7_mib": 100,
        "limit_fsyncs": 2000,
        "scale_objects": 1_000_000,
        "scale_batch": 50_000,
        "scale_cache_mib": (16, 64),
    },
    "quick": {
        "w1_commits": 200,
        "w2_objects": 5_000,
        "w4_transactions": 500,
        "w5_commits": 50,
        "w7_mib": 8,
        "limit_fsyncs": 300,
        "scale_objects": 50_000,
        "scale_batch": 25_000,
        "scale_cache_mib": (4,),
    },
    "tiny": {
        "w1_commits": 20,
        "w2_objects": 300,
        "w4_transactions": 30,
        "w5_commits": 10,
        "w7_mib": 1,
        "limit_fsyncs": 20,
        "scale_objects": 300,
        "scale_batch": 100,
        "scale_cache_mib": (1,),
    },
}

MIB = 1 << 20
# W7 reads a stored file this much at a time, in every system: Dobbin's
# stream chunk (dobbin.record.STREAM_CHUNK).
READ_CHUNK = 64 * 1024

#: One clock for every interval measured inside a process.
clock = time.perf_counter
#: A clock comparable between processes (CLOCK_MONOTONIC), for W5.
shared_clock = time.monotonic


def item_fields(i):
    """(name, value, tags) of item number `i`: a short str, an int, 3 short strs."""
    return "item%d" % i, i, ["t%d" % (i % 7), "u%d" % (i % 11), "v%d" % (i % 13)]


def touch(item):
    """Read every field of an item, as a scan does; return something to sum."""
    return item.value + len(item.name) + len(item.tags)


def peak_rss_mib():
    """This process's peak resident set size so far, in MiB (Linux: KiB units)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib():
    """This process's resident set size now, in MiB."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * resource.getpagesize() / MIB


def w5_expected(commits, shared):
    """What every W5 counter must read after `WRITERS` writers each made
    `commits` increments: writer w adds 1 to counter i % CONTENDED_OBJECTS
    of its own block of counters (block 0 for all when `shared`) at its
    i-th commit."""
    counters = [0] * (WRITERS * CONTENDED_OBJECTS)
    for writer in range(WRITERS):
        first = 0 if shared else writer * CONTENDED_OBJECTS
        for i in range(commits):
            counters[first + i % CONTENDED_OBJECTS] += 1
    return counters


def expect(condition, message):
    """Fail the measurement (not with assert: -O must not skip the check)."""
    if not condition:
        raise BenchmarkError(message)


class BenchmarkError(Exception):
    """A workload did not do what it claims to measure (wrong count, lost data)."""
