"""The command line: run the workloads, alternating systems, and report.

    python -m bench [--quick] [--only W1,W3,...] [--runs N] [--systems dobbin,zodb,durus]
                    [--no-write] [--output PATH] [--dir DIR] [--keep]
    python -m bench --scale [--quick] [--runs N]
    python -m bench --profile W2       Dobbin's side of one workload under cProfile

`run_benchmarks` is the whole measurement, callable without the command
line (the test suite calls it with tiny sizes).  A task that fails is
reported and the rest go on; the exit code is 1 if any failed.  Targets
not met do not change the exit code: they are figures, not tests.
"""

import argparse
import datetime
import importlib
import importlib.util
import inspect
import io
import os
import shlex
import shutil
import sys
import tempfile
import time

from bench import machine, plan, report
from bench.child import ChildError
from bench.servers import ServerError
from bench.spec import SIZES
from bench.targets import Results

SYSTEMS = ("dobbin", "zodb", "durus")
#: The module each peer needs; a peer that is not installed is skipped.
PEER_MODULES = {"zodb": ("ZODB", "ZEO", "BTrees"), "durus": ("durus",)}
SECTIONS = plan.WORKLOADS + ("broker",)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def say(message):
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def available_systems(requested=SYSTEMS):
    """The requested systems that can run here, and notes about the others."""
    systems, notes = [], []
    for system in requested:
        missing = [name for name in PEER_MODULES.get(system, ())
                   if importlib.util.find_spec(name) is None]
        if missing:
            notes.append("%s skipped: %s not installed (pip install -e .[bench])"
                         % (system, ", ".join(missing)))
        else:
            systems.append(system)
    return systems, notes


def _summary(values):
    return ", ".join("%s %s" % (key.split(".", 1)[1], report.number(value))
                     for key, value in values.items())


def run_benchmarks(workloads, systems, sizes, runs, workdir, keep=False, log=say):
    """Measure `workloads` on `systems` `runs` times; return the session dict.

    Within each run each workload's tasks (the systems', and the machine
    limit that bounds the workload) run in an order that rotates from run
    to run.
    """
    started = time.monotonic()
    results = Results(runs)
    notes = []
    failures = 0
    loads = []
    for run in range(runs):
        # Other processes on the machine skew absolute figures: say how busy it was.
        loads.append("%.2f" % os.getloadavg()[0])
        run_dir = os.path.join(workdir, "run%d" % (run + 1))
        os.makedirs(run_dir, exist_ok=True)
        context = plan.Context(workdir, run_dir, sizes)
        batches = [plan.tasks(w, systems) for w in workloads]
        for batch in batches:
            turn = run % len(batch) if batch else 0
            for task in batch[turn:] + batch[:turn]:
                label = "run %d/%d %s %s" % (run + 1, runs, task.workload,
                                             plan.VARIANTS[task.variant])
                # No task may pay for its predecessor's unsynced writes (ZODB's
                # blobs, Durus's commits) when its own fsync waits on the disk.
                os.sync()
                try:
                    values = task.measure(context)
                except (ChildError, ServerError, OSError) as error:
                    failures += 1
                    notes.append("%s failed: %s" % (label, str(error).strip()[-500:]))
                    log("%s: FAILED\n%s" % (label, error))
                    continue
                results.add(run, task.variant, task.durability, values, task.synced)
                log("%s: %s" % (label, _summary(values)))
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    description = machine.describe(workdir)
    description["load average (1 min) at each run's start"] = ", ".join(loads)
    cpus = os.cpu_count() or 1
    if max(float(load) for load in loads) > 0.5 * cpus:
        notes.append("Other processes kept the machine busy during this run (load average "
                     "%s on %d CPUs): absolute figures are lower and noisier than on an "
                     "idle machine; read the side-by-side ratios." % (", ".join(loads), cpus))
    return {"results": results, "runs": runs, "sizes": sizes, "notes": notes,
            "failures": failures, "machine": description,
            "elapsed": time.monotonic() - started,
            "finished": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


class _Tee(io.TextIOBase):
    """Copies what is written to the console and keeps it."""

    def __init__(self, stream):
        self.stream = stream
        self.parts = []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def run_broker_section(argv):
    """Run bench/bench_broker.py's `main(argv)` if it exists; return report markdown."""
    try:
        module = importlib.import_module("bench.bench_broker")
    except ModuleNotFoundError as error:
        if error.name != "bench.bench_broker":
            raise
        return "Skipped: bench/bench_broker.py does not exist yet."
    entry = getattr(module, "main", None)
    if entry is None:
        return "Skipped: bench/bench_broker.py has no main(argv)."
    say("broker: bench.bench_broker.main(%r)" % (argv,))
    tee = _Tee(sys.stdout)
    saved, sys.stdout = sys.stdout, tee
    try:
        takes_argv = bool(inspect.signature(entry).parameters)
        returned = entry(argv) if takes_argv else entry()
    except SystemExit as exit:
        returned = exit.code
    except Exception as error:  # another engineer's module: report, don't crash our run
        returned = "failed: %s: %s" % (type(error).__name__, error)
    finally:
        sys.stdout = saved
    output = "".join(tee.parts).strip()
    if isinstance(returned, str) and not returned.startswith("failed: "):
        return returned
    status = "exit status %r" % (returned,) if not isinstance(returned, str) else returned
    return "Ran `bench.bench_broker.main(%r)`: %s.\n\n```\n%s\n```" % (argv, status, output)


def profile_workload(workload, sizes, workdir):
    """Run Dobbin's side of `workload` once under cProfile (stats go to stderr)."""
    tasks = [task for task in plan.tasks(workload, ("dobbin",)) if task.variant == "dobbin"][:1]
    if not tasks:
        say("nothing to profile for %s" % workload)
        return 2
    run_dir = os.path.join(workdir, "profile")
    os.makedirs(run_dir, exist_ok=True)
    context = plan.Context(workdir, run_dir, sizes, profile=True)
    say("%s dobbin under cProfile: %s" % (workload, _summary(tasks[0].measure(context))))
    return 0


def parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Dobbin, ZODB/ZEO and Durus side by side (issue 4's workloads).")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, 1 run: a smoke check (does not write docs "
                             "unless --output is given)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections among %s (default: all)"
                             % ",".join(SECTIONS))
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3; quick 1)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated systems (default: %s)" % ",".join(SYSTEMS))
    parser.add_argument("--no-write", action="store_true", help="print only; write no docs")
    parser.add_argument("--output", help="report path (default docs/benchmarks.md, or "
                                         "docs/benchmarks_scale.md with --scale)")
    parser.add_argument("--dir", help="work directory (default: a new temporary one); "
                                      "its file system is the one measured")
    parser.add_argument("--keep", action="store_true", help="keep the database files")
    parser.add_argument("--scale", action="store_true",
                        help="the scale mode: 1M objects in a B-tree (not in the default run)")
    parser.add_argument("--profile", metavar="WORKLOAD",
                        help="run Dobbin's side of one workload under cProfile and exit")
    parser.add_argument("--broker-args", default="",
                        help="arguments for bench.bench_broker.main, as one string "
                             "(default: none, its own defaults)")
    options = parser.parse_args(argv)
    options.sections = [s.strip() for s in options.only.split(",") if s.strip()]
    unknown = set(options.sections) - set(SECTIONS)
    if unknown:
        parser.error("unknown sections %s; choose among %s"
                     % (",".join(sorted(unknown)), ",".join(SECTIONS)))
    options.systems = [s.strip() for s in options.systems.split(",") if s.strip()]
    if set(options.systems) - set(SYSTEMS):
        parser.error("systems are among %s" % ",".join(SYSTEMS))
    if options.runs is not None and options.runs < 1:
        parser.error("--runs must be at least 1")
    return options


def main(argv=None):
    options = parse(sys.argv[1:] if argv is None else argv)
    mode = "quick" if options.quick else "default"
    sizes = SIZES[mode]
    runs = options.runs or (1 if options.quick else 3)
    workdir = options.dir or tempfile.mkdtemp(prefix="dobbin-bench-")
    os.makedirs(workdir, exist_ok=True)
    write = not options.no_write and (not options.quick or options.output)
    try:
        if options.scale:
            from bench import scale
            output = options.output or os.path.join(ROOT, "docs", "benchmarks_scale.md")
            return scale.main(sizes, runs, workdir, output if write else None, mode)
        if options.profile:
            return profile_workload(options.profile, sizes, workdir)
        systems, notes = available_systems(options.systems)
        for note in notes:
            say(note)
        workloads = [w for w in plan.WORKLOADS if w in options.sections]
        say("bench: %s mode, %d run(s), workloads %s, systems %s, in %s"
            % (mode, runs, ",".join(workloads) or "none", ",".join(systems), workdir))
        session = run_benchmarks(workloads, systems, sizes, runs, workdir, options.keep)
        session["notes"] = notes + session["notes"]
        session["mode"] = mode
        if "broker" in options.sections:
            session["broker"] = run_broker_section(shlex.split(options.broker_args))
        say("\n" + report.tables(session))
        if session.get("broker"):
            say("\nBroker: " + session["broker"])
        if write:
            output = options.output or os.path.join(ROOT, "docs", "benchmarks.md")
            chart = os.path.splitext(output)[0] + ".png"
            report.write(session, output, chart)
            say("\nwrote %s and %s" % (output, chart))
        else:
            say("\n(no report written%s)" % (": quick mode; pass --output PATH to write one"
                                              if options.quick and not options.no_write else ""))
        return 1 if session["failures"] else 0
    finally:
        if not options.keep and not options.dir:
            shutil.rmtree(workdir, ignore_errors=True)
