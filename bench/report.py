"""The results as tables (console and docs/benchmarks.md) and as a chart.

`tables(session)` renders the markdown both the console and the report
show; `write(session, markdown_path, chart_path)` writes the report and
its PNG.  `session` is the dict the runner fills: results, durability
per (measure, variant), runs, mode, sizes, machine, notes, broker.
"""

import os

from bench.plan import VARIANTS, system_of
from bench.targets import MEASURE, MEASURES, describe_target, judge_all, median, paired_ratio

#: Measures whose machine limit bounds them, to show each as a fraction of it.
LIMIT_OF = {
    "W1.commits_per_s": "limits.fsyncs_per_s",
    "W5-disjoint.commits_per_s": "limits.fsyncs_per_s",
    "W5-same.commits_per_s": "limits.fsyncs_per_s",
    "W7.write_mib_s": "limits.write_mib_s",
}

_MET = {True: "**met**", False: "**not met**", None: "not measured"}
#: Counts, not rates: shown as integers, never divided.
_COUNTS = ("updates", "retries")


def number(value):
    """A figure rounded for reading: 3,958 / 60.7 / 1.56 / 0.81."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return "{:,d}".format(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return "{:,.0f}".format(value)
    if magnitude >= 100:
        return "%.0f" % value
    if magnitude >= 10:
        return "%.1f" % value
    if magnitude >= 1 or magnitude == 0:
        return "%.2f" % value
    return "%.3g" % value


def ratio(value):
    return "-" if value is None else "%.2f x" % value


def _comparable_dobbin(results, measure, variant):
    """The Dobbin variant to compare `variant` with: same durability if we ran one."""
    if variant == "durus" and (measure, "dobbin-nofsync") in results:
        return "dobbin-nofsync"
    return "dobbin"


def targets_table(results):
    lines = ["| target | durability of the Dobbin figure | Dobbin (median) | compared with "
             "(median) | measured (median of per-run ratios) | target | verdict |",
             "|---|---|---|---|---|---|---|"]
    for verdict in judge_all(results):
        check = verdict.check
        unit = MEASURE[check.measure].unit
        if check.reference is None:
            against, measured = "-", "%s %s" % (number(verdict.ratio), unit)
        else:
            against = "%s %s" % (number(verdict.reference), MEASURE[check.reference[0]].unit)
            measured = ratio(verdict.ratio)
        lines.append("| %s | %s | %s %s | %s | %s | %s | %s |" % (
            check.name, results.durability(check.measure, check.variant),
            number(verdict.value), unit, against, measured, describe_target(check),
            _MET[verdict.met]))
    return "\n".join(lines)


def measurements_table(results):
    lines = ["| workload | measure | system | durability | median | runs (min-max) | "
             "Dobbin / this | of machine limit (synced variants) |",
             "|---|---|---|---|---|---|---|---|"]
    for measure in MEASURES:
        variants = [v for v in VARIANTS if (measure.key, v) in results]
        for variant in variants:
            values = results[(measure.key, variant)]
            present = [v for v in values if v is not None]
            show = (lambda v: "%d" % v) if measure.unit in _COUNTS else number
            spread = "%s-%s" % (show(min(present)), show(max(present))) if present else "-"
            against = "-"
            if (system_of(variant) != "dobbin" and variant != "machine"
                    and measure.unit not in _COUNTS):
                dobbin = _comparable_dobbin(results, measure.key, variant)
                against = ratio(paired_ratio(results, (measure.key, dobbin),
                                             (measure.key, variant)))
                if dobbin != "dobbin":
                    against += " (vs %s)" % VARIANTS[dobbin]
            limit = "-"
            if measure.key in LIMIT_OF and results.synced(measure.key, variant):
                fraction = paired_ratio(results, (measure.key, variant),
                                        (LIMIT_OF[measure.key], "machine"))
                limit = "-" if fraction is None else "%.0f%%" % (100 * fraction)
            unit = measure.unit if measure.higher_is_better else measure.unit + ", lower is better"
            lines.append("| %s | %s (%s) | %s | %s | %s | %d of %d, %s | %s | %s |" % (
                measure.workload, measure.label, unit, VARIANTS[variant],
                results.durability(measure.key, variant), show(median(values)),
                len(present), len(values), spread, against, limit))
    return "\n".join(lines)


def tables(session):
    results = session["results"]
    return "\n\n".join([
        "### Targets (issue 4)\n\n" + targets_table(results),
        "### All measurements (medians of %d runs)\n\n" % session["runs"]
        + measurements_table(results)])


# -- the chart ---------------------------------------------------------------

def _advantage(results, measure, peer):
    """Dobbin vs `peer` on `measure`, oriented so that > 1 means Dobbin is better."""
    dobbin = _comparable_dobbin(results, measure.key, peer)
    value = paired_ratio(results, (measure.key, dobbin), (measure.key, peer))
    if value is None or value == 0:
        return None
    return value if measure.higher_is_better else 1 / value


def chart(session, path):
    """Write a PNG: targets as score bars (1.0 = target), and Dobbin vs each peer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = session["results"]
    verdicts = [v for v in judge_all(results) if v.score is not None]
    compared = [m for m in MEASURES if m.workload not in ("limits",)
                and not m.key.endswith((".lost_updates", ".retries", ".scan_s"))]
    peers = [("zodb", "ZODB / ZEO", "#4c72b0"), ("durus", "Durus", "#dd8452")]

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 10), constrained_layout=True)

    names = [v.check.name for v in verdicts]
    scores = [v.score for v in verdicts]
    colours = ["#55a868" if v.met else "#c44e52" for v in verdicts]
    positions = range(len(verdicts))
    top.barh(positions, scores, color=colours, left=0)
    top.set_yticks(list(positions), names)
    top.invert_yaxis()
    top.set_xscale("log")
    top.axvline(1.0, color="black", linestyle="--", linewidth=1)
    for position, verdict in zip(positions, verdicts):
        label = (number(verdict.ratio) if verdict.check.reference is None
                 else ratio(verdict.ratio)) + " (target " + describe_target(verdict.check) + ")"
        top.text(verdict.score, position, " " + label, va="center", fontsize=8)
    low = min(scores + [0.5]) / 1.5
    top.set_xlim(low, max(scores + [2]) * 8)
    top.set_title("Dobbin against issue 4's targets: measured / required, log scale\n"
                  "(green, right of the dashed line: met)")

    labels = ["%s %s" % (m.workload, m.label) for m in compared]
    width = 0.38
    for offset, (peer, title, colour) in enumerate(peers):
        values = [_advantage(results, m, peer) for m in compared]
        xs = [i + (offset - 0.5) * width for i in range(len(compared))]
        bottom.bar([x for x, v in zip(xs, values) if v is not None],
                   [v for v in values if v is not None], width, label=title, color=colour)
    bottom.set_yscale("log")
    bottom.axhline(1.0, color="black", linestyle="--", linewidth=1)
    bottom.set_xticks(range(len(compared)), labels, rotation=30, ha="right", fontsize=8)
    bottom.set_ylabel("Dobbin's advantage (x; > 1 = Dobbin better)")
    bottom.set_title("Dobbin vs each peer: median of per-run ratios, log scale\n"
                     "(Durus's no-fsync W1 is compared with Dobbin durability=\"none\")")
    bottom.legend()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- the report ----------------------------------------------------------------

def _machine(session):
    lines = ["| | |", "|---|---|"]
    for key, value in session["machine"].items():
        lines.append("| %s | %s |" % (key, value))
    return "\n".join(lines)


def write(session, markdown_path, chart_path):
    """Write docs/benchmarks.md and its chart."""
    os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
    chart(session, chart_path)
    sizes = session["sizes"]
    chart_name = os.path.relpath(chart_path, os.path.dirname(os.path.abspath(markdown_path)))
    parts = [
        "# Benchmarks: Dobbin, ZODB/ZEO and Durus side by side",
        "Written by `python -m bench` (`python3 tasks.py bench`) on %s, in %.0f s; "
        "mode `%s`, %d runs.  Do not edit by hand: run it again."
        % (session["finished"], session["elapsed"], session["mode"], session["runs"]),
        "## How to read it",
        "- Every measurement runs in a fresh process.  In each run the systems "
        "take turns workload by workload, the order rotating between runs, and the "
        "machine's limits take their turn with the workload they bound (the fsync rate "
        "with W1, the write bandwidth with W7), on the same file system.  Before each "
        "measurement the runner calls `sync()`, so none pays for another's unsynced "
        "writes, and the measuring process, once its imports are done, collects "
        "garbage once, so none pays for collecting what importing left (a collection "
        "of those objects took about 1 ms, half of a fresh-process open).\n"
        "- A figure is the median over runs.  A ratio is the median of the per-run "
        "ratios of figures measured side by side, which is what counts: absolute "
        "figures drift by about 20%% on this kind of machine.\n"
        "- Durability differs between the systems' defaults and is stated on every row. "
        "ZODB's FileStorage fsyncs each commit (its blob files are not fsynced). "
        "Durus's FileStorage never fsyncs a commit (`durus/file.py` flushes to the "
        "operating system; fsync only when packing), so its figures are "
        "no-fsync figures; \"Durus + fsync\" is Durus with one fsync added per commit "
        "by a 3-line FileStorage subclass of ours.  Dobbin fdatasyncs each commit "
        "unless opened with `durability=\"none\"`.\n"
        "- Object shape: a persistent Item with `name` (short str), `value` (int) and "
        "`tags` (3 short strs).  W1: %(w1_commits)d commits cycling over 100 Items, each "
        "changing one value.  W2: one commit of %(w2_objects)d new Items into each "
        "system's B-tree (Dobbin `dobbin.btree.OOBTree`, ZODB `BTrees.OOBTree`, Durus "
        "`durus.btree.BTree`).  W3: that file opened in a fresh process, all Items "
        "scanned, peak RSS from `getrusage`.  W4: a file of %(w4_transactions)d W1 "
        "commits opened in a fresh process.  W5: 2 processes x %(w5_commits)d commits, "
        "each adding 1 to one of 10 counters (their own 10, or the same 10), retrying "
        "conflicts; each counter is then checked (a shortfall is a lost update, an "
        "excess fails the run); Dobbin's processes open the file themselves, ZODB's go through a "
        "ZEO server and Durus's through its storage server, both on 127.0.0.1.  W7: "
        "a %(w7_mib)d MiB file of random bytes stored and read back after reopening "
        "(Dobbin `PersistentFile`/`PersistentStream`, ZODB `Blob`, Durus a bytes "
        "attribute)." % sizes,
        "## Machine",
        _machine(session),
        "## Results",
        tables(session),
        "![Dobbin's targets and its ratios to each peer](%s)" % chart_name,
    ]
    if session["notes"]:
        parts += ["## Notes from this run", "\n".join("- " + note for note in session["notes"])]
    broker = session.get("broker")
    if broker:
        parts += ["## Broker (bench/bench_broker.py)", broker]
    parts += ["## Scale",
              "`python -m bench --scale` (not part of the default run) puts 1M Items in "
              "a B-tree and checks open time and RSS against `cache_size`; it writes "
              "[benchmarks_scale.md](benchmarks_scale.md)."]
    with open(markdown_path, "w") as f:
        f.write("\n\n".join(parts) + "\n")
