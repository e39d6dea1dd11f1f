"""Which measurements make up each workload, and how each one runs.

A `Task` is one workload on one system variant with the durability it
runs at, stated for the report.  `tasks(workload, systems)` lists them;
the runner calls `Task.measure` once per run, alternating systems.
Each measurement runs in fresh processes (`bench.child`); setup steps
that are not timed run in processes of their own too.
"""

import os
import shutil

from bench import child, contention
from bench.spec import MIB

WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W7")

#: Display names of the variants measured.
VARIANTS = {
    "dobbin": "Dobbin",
    "dobbin-nofsync": "Dobbin, durability=\"none\"",
    "zodb": "ZODB",
    "zodb-noindex": "ZODB, .index deleted",
    "durus": "Durus",
    "durus-fsync": "Durus + fsync",
    "machine": "machine limit",
}


def system_of(variant):
    """"dobbin-nofsync" -> "dobbin"."""
    return variant.split("-")[0]


class Context:
    """Where one run works, at which sizes, and whether to profile Dobbin."""

    def __init__(self, workdir, run_dir, sizes, profile=False):
        self.workdir = workdir
        self.run_dir = run_dir
        self.sizes = sizes
        self.profile = profile

    def directory(self, variant):
        path = os.path.join(self.run_dir, variant)
        os.makedirs(path, exist_ok=True)
        return path

    def source_file(self, mib):
        """A file of `mib` MiB of random bytes for W7, made once per session."""
        path = os.path.join(self.workdir, "w7-source-%d" % mib)
        if not os.path.exists(path):
            with open(path + ".tmp", "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(MIB))
            os.rename(path + ".tmp", path)
            os.sync()  # its writeback must not land inside the first W7 measurement
        return path


class Task:
    """One workload on one variant: `measure(context)` returns {measure key: value}.

    `synced` says whether its commits wait for the disk (fsync or fdatasync).
    """

    def __init__(self, workload, variant, durability, function, synced=True):
        self.workload = workload
        self.variant = variant
        self.durability = durability
        self.synced = synced
        self._function = function

    def measure(self, context):
        profile = context.profile and system_of(self.variant) == "dobbin"
        return self._function(context, profile)

    def __repr__(self):
        return "<Task %s %s>" % (self.workload, self.variant)


# -- the workloads ---------------------------------------------------------

def _w1(variant, **options):
    def measure(context, profile):
        path = os.path.join(context.directory(variant), "w1.db")
        result = child.run("workloads_" + system_of(variant), "w1", profile=profile, path=path,
                           commits=context.sizes["w1_commits"], **options)
        return {"W1.commits_per_s": result["commits_per_s"]}
    return measure


def _w2_path(context, system):
    return os.path.join(context.directory(system), "w2.db")


def _w2(system):
    def measure(context, profile):
        result = child.run("workloads_" + system, "w2", profile=profile,
                           path=_w2_path(context, system), objects=context.sizes["w2_objects"])
        return {"W2.objects_per_s": result["objects_per_s"]}
    return measure


def _w3(system):
    def measure(context, profile):
        path = _w2_path(context, system)
        objects = context.sizes["w2_objects"]
        if not os.path.exists(path):  # W2 did not run in this run: build its file
            child.run("workloads_" + system, "w2", path=path, objects=objects)
        result = child.run("workloads_" + system, "w3", profile=profile, path=path,
                           objects=objects)
        return {"W3." + key: value for key, value in result.items()}
    return measure


def _w4(variant, **options):
    def measure(context, profile):
        path = os.path.join(context.directory(variant), "w4.db")
        module = "workloads_" + system_of(variant)
        child.run(module, "w4_setup", path=path, transactions=context.sizes["w4_transactions"])
        result = child.run(module, "w4", profile=profile, path=path, **options)
        return {"W4.open_ms": result["open_ms"]}
    return measure


def _w5(system, shared):
    key = "W5-same" if shared else "W5-disjoint"

    def measure(context, profile):
        directory = context.directory(system + ("-w5same" if shared else "-w5disjoint"))
        result = contention.run(system, directory, context.sizes["w5_commits"], shared, profile)
        shutil.rmtree(directory)
        return {key + "." + name: value for name, value in result.items()}
    return measure


def _w7(system):
    def measure(context, profile):
        mib = context.sizes["w7_mib"]
        directory = context.directory(system + "-w7")
        result = child.run("workloads_" + system, "w7", profile=profile,
                           path=os.path.join(directory, "w7.db"),
                           source=context.source_file(mib), mib=mib)
        shutil.rmtree(directory)
        return {"W7." + name: value for name, value in result.items()}
    return measure


def _fsync_limit(context, profile):
    result = child.run("machine", "fsync_limits", directory=context.directory("machine"),
                       count=context.sizes["limit_fsyncs"])
    return {"limits." + name: value for name, value in result.items()}


def _write_limit(context, profile):
    result = child.run("machine", "write_limit", directory=context.directory("machine"),
                       mib=context.sizes["w7_mib"])
    return {"limits." + name: value for name, value in result.items()}


# The machine's limits take their turn among the systems of the workload
# they bound, so each ratio to a limit compares figures measured side by side.
_TASKS = [
    Task("W1", "machine", "fsync (and, apart, fdatasync) after each 4 KiB append",
         _fsync_limit),
    Task("W1", "dobbin", "fdatasync per commit (default)", _w1("dobbin")),
    Task("W1", "dobbin-nofsync", "no fsync (durability=\"none\")",
         _w1("dobbin-nofsync", durability="none"), synced=False),
    Task("W1", "zodb", "fsync per commit (FileStorage default)", _w1("zodb")),
    Task("W1", "durus", "no fsync (stock FileStorage: flush only)", _w1("durus"),
         synced=False),
    Task("W1", "durus-fsync", "fsync per commit (FileStorage subclass, ours)",
         _w1("durus-fsync", fsync=True)),
    Task("W2", "dobbin", "fdatasync per commit (default)", _w2("dobbin")),
    Task("W2", "zodb", "fsync per commit", _w2("zodb")),
    Task("W2", "durus", "no fsync", _w2("durus"), synced=False),
    Task("W3", "dobbin", "read only; default cache_size (128 MiB)", _w3("dobbin")),
    Task("W3", "zodb", "read only; default cache (400 objects)", _w3("zodb")),
    Task("W3", "durus", "read only; default cache (100,000 objects)", _w3("durus")),
    Task("W4", "dobbin", "no sidecar file (index checkpointed in the log)", _w4("dobbin")),
    Task("W4", "zodb", "Data.fs.index present (saved at close)", _w4("zodb")),
    Task("W4", "zodb-noindex", "Data.fs.index deleted: FileStorage scans the file",
         _w4("zodb-noindex", drop_index=True)),
    Task("W4", "durus", "no sidecar file", _w4("durus")),
    Task("W5", "dobbin", "2 processes on one file, fdatasync per commit",
         _w5("dobbin", False)),
    Task("W5", "zodb", "ZEO server, FileStorage fsync per commit", _w5("zodb", False)),
    Task("W5", "durus", "Durus server, no fsync", _w5("durus", False), synced=False),
    Task("W5", "dobbin", "2 processes on one file, fdatasync per commit", _w5("dobbin", True)),
    Task("W5", "zodb", "ZEO server, FileStorage fsync per commit", _w5("zodb", True)),
    Task("W5", "durus", "Durus server, no fsync", _w5("durus", True), synced=False),
    Task("W7", "machine", "the same size in 1 MiB writes + fdatasync, best of 3", _write_limit),
    Task("W7", "dobbin", "one record, fdatasync (stream staged inside the log first)", _w7("dobbin")),
    Task("W7", "zodb", "blob file not fsynced; its record fsynced", _w7("zodb"), synced=False),
    Task("W7", "durus", "no fsync; zlib-compressed pickle", _w7("durus"), synced=False),
]

def tasks(workload, systems):
    """The tasks of `workload` for `systems` (and the machine), in a fixed order."""
    return [task for task in _TASKS if task.workload == workload
            and (task.variant == "machine" or system_of(task.variant) in systems)]
