"""A writer process of the kill -9 test: bank transfers until it is killed.

    python -m reliability.bank_worker PATH KEY REPORT SEED

Each transfer moves money between two of the accounts and records its
sequence number in this incarnation's Progress object, in the same
transaction.  Only after transaction.commit() has returned does it
append "KEY SEQ" to the REPORT file: a reported transfer must survive.
"""

import os
import random
import sys

import transaction

from dobbin.database import Database
from dobbin.persistent import checkout

from reliability.models import Progress


def main(path, key, report, seed):
    rng = random.Random(seed)
    db = Database(path)  # durability="fsync", the default
    out = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for attempt in transaction.manager.attempts(1000):
        with attempt:
            progress = db.root["progress"]
            checkout(progress)
            progress[key] = Progress()
    mine = db.root["progress"][key]
    seq = 0
    while True:
        seq += 1
        for attempt in transaction.manager.attempts(1000):
            with attempt:
                first, second = rng.sample(db.root["accounts"], 2)
                amount = rng.randrange(1, 100)
                checkout(first)
                checkout(second)
                checkout(mine)
                first.balance -= amount
                second.balance += amount
                mine.seq = seq
        os.write(out, b"%s %d\n" % (key.encode(), seq))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
