"""A process that takes a database's write lock, for the lock tests.

    python -m reliability.lock_holder hold PATH
        take the lock, print "locked", hold it until killed
    python -m reliability.lock_holder cycle PATH LOG TIMES
        TIMES times: take the lock, append "enter PID" and "exit PID" to
        LOG with a short sleep between, give the lock up
    python -m reliability.lock_holder try PATH TIMEOUT
        try to open PATH (opening takes the lock); print "opened" or
        "timeout: <message>"
"""

import os
import sys
import time

from dobbin.database import Database
from dobbin.exc import LockTimeoutError


def hold(path):
    db = Database(path)
    db._lock.acquire()
    print("locked", flush=True)
    while True:
        time.sleep(60)


def cycle(path, log, times):
    db = Database(path)
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()
    for _ in range(times):
        with db._lock:
            os.write(out, b"enter %d\n" % pid)
            time.sleep(0.001)
            os.write(out, b"exit %d\n" % pid)
    db.close()


def try_open(path, timeout):
    try:
        Database(path, lock_timeout=timeout).close()
    except LockTimeoutError as error:
        print("timeout: %s" % error, flush=True)
    else:
        print("opened", flush=True)


if __name__ == "__main__":
    mode, arguments = sys.argv[1], sys.argv[2:]
    if mode == "hold":
        hold(arguments[0])
    elif mode == "cycle":
        cycle(arguments[0], arguments[1], int(arguments[2]))
    else:
        try_open(arguments[0], float(arguments[1]))
