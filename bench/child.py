"""Run one workload function in a fresh process, and talk to that process.

Parent side: `run(module, function, **kwargs)` starts
``python -m bench.child MODULE FUNCTION JSON``, waits, and returns the
function's result dict; `start` does the same without waiting, for
W5's writers, which say when they are ready and wait for `release`.

Child side (``__main__``): imports ``bench.MODULE``, collects garbage
once (so that no measurement pays for collecting what importing left),
calls FUNCTION with the JSON keyword arguments, and prints ``BENCH-RESULT <json>`` on
stdout.  Anything else the workload prints goes to stderr, so stdout
carries only the protocol.  A function that takes a `go` argument gets a
callable that prints ``BENCH-READY`` and waits for a line on stdin.
"""

import gc
import inspect
import json
import os
import subprocess
import sys

RESULT = "BENCH-RESULT "
READY = "BENCH-READY"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChildError(Exception):
    """A measurement's process failed; the message carries its stderr tail."""


def _command(module, function, kwargs, profile):
    command = [sys.executable, "-m", "bench.child", module, function, json.dumps(kwargs)]
    if profile:
        command.append("--profile")
    return command


def start(module, function, profile=False, **kwargs):
    """Start a child running ``bench.<module>.<function>(**kwargs)``; return the Popen."""
    return subprocess.Popen(_command(module, function, kwargs, profile), cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_ready(process):
    """Block until a child started with `start` has printed BENCH-READY."""
    for line in process.stdout:
        if line.strip() == READY:
            return
    raise ChildError("child exited before it was ready: %s" % process.stderr.read()[-2000:])


def release(process):
    """Let a ready child go."""
    process.stdin.write("go\n")
    process.stdin.flush()


def finish(process, timeout=None, describe="child"):
    """Wait for a started child; return its result dict or raise ChildError."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise ChildError("%s timed out after %s s; stderr: %s" % (describe, timeout, err[-2000:]))
    if err and "--profile" in process.args:
        sys.stderr.write(err)
    for line in out.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    raise ChildError("%s failed (exit %s): %s" % (describe, process.returncode,
                                                   err.strip()[-3000:] or "no output"))


def run(module, function, timeout=3600, profile=False, **kwargs):
    """Run ``bench.<module>.<function>(**kwargs)`` in a fresh process; return its result."""
    process = start(module, function, profile=profile, **kwargs)
    return finish(process, timeout, "%s.%s" % (module, function))


def _main(argv):
    module_name, function_name, arguments = argv[:3]
    profile = "--profile" in argv[3:]
    protocol = sys.stdout
    sys.stdout = sys.stderr  # the workload's own prints stay off the protocol

    def go():
        protocol.write(READY + "\n")
        protocol.flush()
        sys.stdin.readline()

    module = __import__("bench." + module_name, fromlist=[function_name])
    function = getattr(module, function_name)
    kwargs = json.loads(arguments)
    if "go" in inspect.signature(function).parameters:
        kwargs["go"] = go
    gc.collect()
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(function, **kwargs)
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)
    else:
        result = function(**kwargs)
    protocol.write(RESULT + json.dumps(result) + "\n")
    protocol.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
