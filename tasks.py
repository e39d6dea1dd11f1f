#!/usr/bin/env python3
"""Set up and run Dobbin's jobs on a machine that has only Python >= 3.10.

Each job first makes sure .venv (next to this file) exists and has the
project installed in editable mode with the extras the job needs.  The
install is skipped while setup.py is unchanged since the last successful
one (a stamp file in .venv records its hash).  Jobs run in the project
directory, so relative paths in ARGS are relative to it.  The exit code
is the job's.

Stdlib only, and no syntax newer than Python 2.7/3.0 (no f-strings), so
that an old Python gets the version message below, not a SyntaxError.
"""

import sys

MIN_PYTHON = (3, 10)

if sys.version_info < MIN_PYTHON:
    sys.exit("tasks.py: Dobbin needs Python %d.%d or newer; %s is %s"
             % (MIN_PYTHON + (sys.executable, sys.version.split()[0])))

import hashlib
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
STAMP = os.path.join(VENV, ".dobbin-install.json")
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PYTHON = os.path.join(BIN, "python.exe" if os.name == "nt" else "python")

USAGE = """\
usage: python3 tasks.py JOB [ARGS...]

  demo  [ARGS]   run examples/demo.py (the main job, embedded database)
  test  [ARGS]   run the test suite: python -m pytest ARGS
  bench [ARGS]   run the benchmarks: python -m bench ARGS

Each job creates .venv next to this file if needed and installs the
project into it (editable) with what the job needs.
"""

# job name -> (extras to install, command run with the venv's python)
JOBS = {
    "demo": (["test"], [os.path.join("examples", "demo.py")]),
    "test": (["test"], ["-m", "pytest"]),
    "bench": (["test", "bench"], ["-m", "bench"]),
}


def say(message):
    # Flush at once so our lines stay in order with the children's output.
    sys.stdout.write("tasks.py: %s\n" % message)
    sys.stdout.flush()


def run(command):
    """Run `command` in the project directory; return its exit code."""
    try:
        return subprocess.call(command, cwd=ROOT)
    except KeyboardInterrupt:
        return 130


def venv_works():
    if not os.path.exists(PYTHON):
        return False
    check = "import sys; sys.exit(sys.version_info < %r)" % (MIN_PYTHON,)
    return run([PYTHON, "-c", check]) == 0


def ensure_venv():
    if venv_works():
        return
    if os.path.exists(VENV):
        say("rebuilding .venv: its python is missing, broken or too old")
    else:
        say("creating .venv with %s" % sys.executable)
    rc = run([sys.executable, "-m", "venv", "--clear", VENV])
    if rc != 0:
        sys.exit("tasks.py: could not create .venv (exit %d); on Debian or "
                 "Ubuntu install the python3-venv package" % rc)
    say("upgrading pip in .venv")
    if run([PYTHON, "-m", "pip", "install", "-q", "--upgrade", "pip"]) != 0:
        # An old pip can still install us; go on and let that step decide.
        say("pip upgrade failed; continuing with the venv's own pip")


def setup_py_hash():
    with open(os.path.join(ROOT, "setup.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_stamp():
    try:
        with open(STAMP) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def ensure_installed(extras):
    """Install the project with `extras` unless the stamp says it's done."""
    digest = setup_py_hash()
    stamp = read_stamp()
    spec = ".[%s]" % ",".join(extras)
    if stamp.get("setup_py_sha256") == digest and \
            set(extras) <= set(stamp.get("extras", [])):
        say("dobbin%s already installed in .venv (setup.py unchanged)"
            % spec[1:])
        return
    say("installing dobbin%s into .venv (editable)" % spec[1:])
    rc = run([PYTHON, "-m", "pip", "install", "-q",
              "--disable-pip-version-check", "-e", spec])
    if rc != 0:
        sys.exit("tasks.py: pip install failed (exit %d); see above" % rc)
    # Only a finished install earns a stamp, so a failed one is retried.
    with open(STAMP, "w") as f:
        json.dump({"setup_py_sha256": digest, "extras": sorted(extras)}, f)


def main(argv):
    if not argv or argv[0] not in JOBS:
        helped = bool(argv) and argv[0] in ("-h", "--help")
        (sys.stdout if helped else sys.stderr).write(USAGE)
        return 0 if helped else 2
    job, args = argv[0], argv[1:]
    extras, command = JOBS[job]
    ensure_venv()
    ensure_installed(extras)
    command = [PYTHON] + command + args
    say("running %s" % " ".join(
        [os.path.relpath(PYTHON, ROOT)] + command[1:]))
    return run(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
