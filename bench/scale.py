"""The scale mode: a million Items in Dobbin's B-tree.

Builds the file once (commits of `scale_batch` Items), then, in a fresh
process per measurement, opens it with a bounded `cache_size` and scans
every Item.  Targets (issue 4): open < 100 ms, and RSS stays within
cache_size plus a fixed overhead while scanning.  The fixed overhead is
measured, not assumed: it is the process's RSS just after opening
(interpreter, modules, the oid index), and the scan's growth above it is
compared with cache_size.  Each cache size is measured `runs` times.
"""

import os
import statistics
import time

import transaction

from bench import child
from bench.spec import MIB, clock, current_rss_mib, expect, item_fields, peak_rss_mib, touch

#: How often (in Items) the scan samples its RSS.
SAMPLE_EVERY = 10_000


def build(path, objects, batch):
    """Fill a new file with `objects` Items in a B-tree, `batch` per commit."""
    from bench.workloads_dobbin import Item
    from dobbin.btree import OOBTree
    from dobbin.database import Database
    from dobbin.persistent import PersistentDict

    db = Database(path)
    root = PersistentDict(tree=OOBTree())
    db.elect(root)
    transaction.commit()
    tree = db.root["tree"]
    start = clock()
    for first in range(0, objects, batch):
        for i in range(first, min(first + batch, objects)):
            tree[i] = Item(*item_fields(i))
        transaction.commit()
    elapsed = clock() - start
    expect(len(tree) == objects, "built %d items, not %d" % (len(tree), objects))
    db.close()
    return {"objects_per_s": objects / elapsed, "file_mib": os.path.getsize(path) / MIB}


def scan(path, objects, cache_mib):
    """In a fresh process: open with `cache_mib` MiB of cache, scan all, watch RSS."""
    from dobbin.database import Database

    start = clock()
    db = Database(path, cache_size=cache_mib * MIB)
    tree = db.root["tree"]
    opened = clock() - start
    baseline = current_rss_mib()
    highest = baseline
    count = total = 0
    start = clock()
    for _key, item in tree.items():
        total += touch(item)
        count += 1
        if count % SAMPLE_EVERY == 0:
            highest = max(highest, current_rss_mib())
    scanned = clock() - start
    expect(count == objects, "scanned %d items, not %d" % (count, objects))
    db.close()
    return {"open_ms": opened * 1000, "scan_s": scanned, "baseline_rss_mib": baseline,
            "peak_rss_mib": max(highest, peak_rss_mib()), "growth_mib": highest - baseline}


def _row(name, value, target, met):
    return "| %s | %s | %s | %s |" % (name, value, target, "**met**" if met else "**not met**")


def main(sizes, runs, workdir, output, mode):
    objects, batch = sizes["scale_objects"], sizes["scale_batch"]
    loads = ["%.2f" % os.getloadavg()[0]]
    path = os.path.join(workdir, "scale.dobbin")
    print("scale: building %d items (%d per commit) in %s" % (objects, batch, path), flush=True)
    built = child.run("scale", "build", path=path, objects=objects, batch=batch)
    print("scale: built at %.0f objects/s, file %.0f MiB" % (built["objects_per_s"],
                                                             built["file_mib"]), flush=True)
    measured = {}
    for run in range(runs):
        for cache_mib in sizes["scale_cache_mib"]:
            result = child.run("scale", "scan", path=path, objects=objects, cache_mib=cache_mib)
            measured.setdefault(cache_mib, []).append(result)
            print("scale: run %d cache %d MiB: open %.1f ms, scan %.1f s, RSS %.0f MiB after "
                  "open, +%.0f MiB while scanning (peak %.0f MiB)"
                  % (run + 1, cache_mib, result["open_ms"], result["scan_s"],
                     result["baseline_rss_mib"], result["growth_mib"], result["peak_rss_mib"]),
                  flush=True)
    rows = ["| check | measured (median of %d) | target | verdict |" % runs, "|---|---|---|---|"]
    for cache_mib, results in measured.items():
        def med(key):
            return statistics.median(r[key] for r in results)
        rows.append(_row("open, cache_size %d MiB" % cache_mib, "%.1f ms" % med("open_ms"),
                         "< 100 ms", med("open_ms") < 100))
        rows.append(_row(
            "RSS growth while scanning, cache_size %d MiB" % cache_mib,
            "+%.0f MiB (%.1f x cache_size) over %.0f MiB after open (peak %.0f MiB); "
            "scan %.1f s" % (med("growth_mib"), med("growth_mib") / cache_mib,
                             med("baseline_rss_mib"), med("peak_rss_mib"), med("scan_s")),
            "<= cache_size (%d MiB) over the RSS after open" % cache_mib,
            med("growth_mib") <= cache_mib))
    loads.append("%.2f" % os.getloadavg()[0])
    table = "\n".join(rows)
    print("\n" + table, flush=True)
    if output:
        with open(output, "w") as f:
            f.write("# Scale: %d Items in Dobbin's B-tree\n\n" % objects
                    + "Written by `python -m bench --scale` on %s (mode `%s`).  The file was "
                    "built with %d Items per commit at %.0f objects/s (%.0f MiB).  Each "
                    "measurement opens it in a fresh process with the given `cache_size` "
                    "and scans every Item, sampling RSS every %d Items; \"after open\" is "
                    "the fixed overhead (interpreter, modules, the oid index).  Load "
                    "average (1 min) at the start and the end: %s on %d CPUs.\n\n"
                    % (time.strftime("%Y-%m-%d %H:%M"), mode, batch, built["objects_per_s"],
                       built["file_mib"], SAMPLE_EVERY, " and ".join(loads), os.cpu_count())
                    + table + "\n")
        print("wrote %s" % output)
    return 0
