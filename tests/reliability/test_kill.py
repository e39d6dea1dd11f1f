"""R5: writers killed with SIGKILL, at random moments, under load.

Three processes make bank transfers between ten accounts; a parent kills
one of them every 10-500 ms and starts a new one in its place.  Each
writer reports a transfer only after its commit returned.  At the end
the money adds up, and every reported transfer is in the file.
"""

import os
import random
import signal
import subprocess
import sys
import time

import transaction

from dobbin.database import Database
from dobbin.persistent import PersistentDict

from .conftest import figures, saved_tails, scaled
from .models import Account

WRITERS = 3
ACCOUNTS = 10
BALANCE = 1000
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)


def start_writer(path, key, reports, seed):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, ROOT, env.get("PYTHONPATH")]))
    report = os.path.join(reports, key + ".txt")
    return subprocess.Popen([sys.executable, "-m", "reliability.bank_worker", path, key,
                             report, str(seed)], env=env, stdin=subprocess.DEVNULL)


def reported(reports):
    """key -> the highest sequence number reported (whole lines only)."""
    highest = {}
    for name in os.listdir(reports):
        with open(os.path.join(reports, name), "rb") as f:
            for line in f.read().split(b"\n")[:-1]:
                key, seq = line.decode().split()
                highest[key] = max(highest.get(key, 0), int(seq))
    return highest


def test_killed_writers_lose_no_reported_commit_and_no_money(tmp_path):
    path = str(tmp_path / "bank.dobbin")
    reports = str(tmp_path / "reports")
    os.mkdir(reports)
    db = Database(path)
    db.elect(PersistentDict({"accounts": [Account(n, BALANCE) for n in range(ACCOUNTS)],
                             "progress": PersistentDict()}))
    transaction.commit()
    db.close()

    rounds = scaled(30, 500)
    budget = scaled(25.0, 900.0)
    rng = random.Random(13)
    incarnations = 0
    writers = []
    for slot in range(WRITERS):
        writers.append(start_writer(path, "w%d-%d" % (slot, incarnations), reports, incarnations))
        incarnations += 1
    started = time.monotonic()
    kills = 0
    try:
        while kills < rounds and time.monotonic() - started < budget:
            time.sleep(rng.uniform(0.010, 0.500))
            slot = rng.randrange(WRITERS)
            victim = writers[slot]
            assert victim.poll() is None, "writer %d died by itself (exit %s)" % (
                slot, victim.returncode)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
            writers[slot] = start_writer(path, "w%d-%d" % (slot, incarnations), reports,
                                         incarnations)
            incarnations += 1
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.send_signal(signal.SIGKILL)
            writer.wait()

    claims = reported(reports)
    db = Database(path)
    try:
        accounts = db.root["accounts"]
        total = sum(account.balance for account in accounts)
        progress = db.root["progress"]
        lost = {key: (seq, progress[key].seq if key in progress else None)
                for key, seq in claims.items()
                if key not in progress or progress[key].seq < seq}
        ahead = {key: (seq, progress[key].seq) for key, seq in claims.items()
                 if key in progress and progress[key].seq > seq + 1}
        report = db.verify()
        transactions = db.tx_count
    finally:
        db.close()
        transaction.abort()
    figures("R5 kill -9", rounds=kills, seconds=round(time.monotonic() - started, 1),
            transactions=transactions, reported_commits=sum(claims.values()),
            lost_commits=len(lost), torn_tails_recovered=len(saved_tails(path)),
            total=total)
    assert total == ACCOUNTS * BALANCE, "money was made or lost: total %d" % total
    assert not lost, "reported commits missing (key: (reported, stored)): %r" % lost
    assert not ahead, "more than one unreported commit per writer: %r" % ahead
    assert report["ok"], report["errors"]
    assert kills >= min(rounds, 10)
