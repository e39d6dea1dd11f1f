"""The machine's limits, and a description of the machine.

The limits are measured in the same run as the workloads and on the same
file system, so each figure can be read as a fraction of what the disk
allows: the rate of 4 KiB appends each followed by fsync (the ceiling
of durable small commits, as issue 4 defines it), the same into space
allocated beforehand followed by fdatasync (the ceiling of the technique
Dobbin's log uses: no file size to make durable), and the bandwidth of
one large write followed by one fsync (the ceiling of storing a large
file durably).
"""

import os
import platform

from bench.spec import MIB, clock

FSYNC_BLOCK = 4096


def fsync_rate(directory, count, sync=os.fsync, reserved=False):
    """Appends of 4 KiB, each followed by `sync`, per second.

    With `reserved`, the file's space is allocated (and synced) first,
    so the writes fill it without changing the file's size.
    """
    path = os.path.join(directory, "limit-fsync")
    block = os.urandom(FSYNC_BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if reserved:
            os.posix_fallocate(fd, 0, count * FSYNC_BLOCK)
        sync(fd)
        start = clock()
        for index in range(count):
            os.pwrite(fd, block, index * FSYNC_BLOCK)
            sync(fd)
        elapsed = clock() - start
    finally:
        os.close(fd)
        os.remove(path)
    return count / elapsed


def write_bandwidth(directory, mib, tries=3):
    """MiB/s of writing `mib` MiB to a new file and syncing it, the best of
    `tries`: the way a big commit writes (space allocated first, 1 MiB
    writes, one fdatasync).  One try alone swung from 300 to 1,900 MiB/s."""
    path = os.path.join(directory, "limit-write")
    data = memoryview(os.urandom(mib * MIB))
    best = 0.0
    for _ in range(tries):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            start = clock()
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, len(data))
            for offset in range(0, len(data), MIB):
                piece, at = data[offset:offset + MIB], offset
                while piece:
                    written = os.pwrite(fd, piece, at)
                    piece, at = piece[written:], at + written
            getattr(os, "fdatasync", os.fsync)(fd)
            best = max(best, mib / (clock() - start))
        finally:
            os.close(fd)
            os.remove(path)
    return best


def fsync_limits(directory, count):
    """The small-commit ceilings, as a result dict (run in a child like a workload)."""
    return {
        "fsyncs_per_s": fsync_rate(directory, count),
        "fdatasyncs_per_s": fsync_rate(directory, count, getattr(os, "fdatasync", os.fsync)),
        "reserved_fdatasyncs_per_s": fsync_rate(directory, count,
                                                getattr(os, "fdatasync", os.fsync), True),
    }


def write_limit(directory, mib):
    """The large-write ceiling, as a result dict (run in a child like a workload)."""
    return {"write_mib_s": write_bandwidth(directory, mib)}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem(directory):
    """(device, type) of the mount holding `directory`, best effort."""
    best = ("?", "?", "")
    directory = os.path.realpath(directory)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, kind = line.split()[:3]
                if (directory == mount or directory.startswith(mount.rstrip("/") + "/")) \
                        and len(mount) >= len(best[2]):
                    best = (device, kind, mount)
    except OSError:
        pass
    return best[0], best[1]


def _memory_gib():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    except (ValueError, OSError, AttributeError):
        return float("nan")


def describe(directory):
    """What the figures were measured on, as a dict of short strings."""
    device, kind = _filesystem(directory)
    return {
        "cpu": "%s x %d" % (_cpu_model(), os.cpu_count() or 0),
        "memory": "%.1f GiB" % _memory_gib(),
        "os": platform.platform(),
        "python": "%s %s" % (platform.python_implementation(), platform.python_version()),
        "filesystem": "%s (%s) at %s" % (kind, device, directory),
    }
