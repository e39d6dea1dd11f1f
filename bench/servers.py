"""ZEO and Durus storage servers, each as a subprocess on 127.0.0.1.

`serve(kind, path)` is a context manager: it starts the server on a
free port over the storage file `path`, waits until the port accepts
connections, yields ``"127.0.0.1:PORT"``, and stops the server (SIGTERM,
then SIGKILL if it lingers) however the block ends.  Its output goes
to ``PATH.server.log``.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"


class ServerError(Exception):
    """A server did not start; carries its output."""


def free_port():
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _command(kind, path, port):
    if kind == "zeo":
        # FileStorage behind ZEO fsyncs each commit, as it does locally.
        return [sys.executable, "-m", "ZEO.runzeo", "-a", "%s:%d" % (HOST, port), "-f", path]
    if kind == "durus":
        # Durus's own server over its FileStorage (no fsync; see workloads_durus).
        return [sys.executable, "-m", "durus", "-s", "--host", HOST, "--port", str(port),
                "--file", path, "--logginglevel", "30"]
    raise ValueError("no server kind %r" % kind)


def _wait_listening(process, port, timeout, log_path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path) as log:
                raise ServerError("server exited with %s: %s"
                                  % (process.returncode, log.read()[-2000:]))
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise ServerError("server did not listen on %s:%d within %s s" % (HOST, port, timeout))


@contextlib.contextmanager
def serve(kind, path, timeout=30):
    """Run a `kind` ("zeo" or "durus") server over `path`; yield its address."""
    port = free_port()
    log_path = path + ".server.log"  # a file, not a pipe: nobody reads it while it runs
    with open(log_path, "w") as log:
        process = subprocess.Popen(_command(kind, os.path.abspath(path), port),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        _wait_listening(process, port, timeout, log_path)
        yield "%s:%d" % (HOST, port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
