"""dobbin.cli: `dobbin serve` and `dobbin shell` as real processes."""

import json
import os
import signal
import subprocess
import sys

import pytest
import transaction

from broker.client import BrokerClient
from broker_fixtures import TIMEOUT, child_env, make_database
from conftest import flip_bit
from dobbin.cli import build_parser, load_app, main
from dobbin.database import Database
from dobbin.log import CHECKPOINT, Log
from dobbin.persistent import PersistentDict, checkout


def start_serving(path, *extra):
    process = subprocess.Popen(
        [sys.executable, "-m", "dobbin", "serve", path, "--bind", "tcp://127.0.0.1:*",
         "--durability", "none"] + list(extra),
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("serving"), process.stderr.read()
    process.serving_line = line
    return process, line.split(" at ")[1].split()[0]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_creates_the_database_and_stops_cleanly(tmp_path, sig):
    path = str(tmp_path / "new.dobbin")
    process, address = start_serving(path)
    try:
        with BrokerClient(address, timeout=TIMEOUT) as client:
            assert client.root is None  # a new, empty database
        process.send_signal(sig)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert (tmp_path / "new.dobbin").exists()
    assert (tmp_path / "new.dobbin.broker-secret").exists()


def test_shell_binds_client_and_root(tmp_path):
    path = str(tmp_path / "db.dobbin")
    subprocess.run([sys.executable, "-c",
                    "import broker_fixtures; broker_fixtures.make_database(%r).close()" % path],
                   env=child_env(), check=True, timeout=30)
    process, address = start_serving(path, "--app", "broker_fixtures:configure")
    try:
        shell = subprocess.run(
            [sys.executable, "-m", "dobbin", "shell", address],
            input="print('title=' + root.title)\nprint(type(client).__name__)\n",
            env=child_env(), capture_output=True, text=True, timeout=30)
        assert shell.returncode == 0, shell.stderr
        assert "title=root" in shell.stdout and "BrokerClient" in shell.stdout
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()


def test_serve_runs_the_workers_asked_for(tmp_path):
    process, address = start_serving(str(tmp_path / "db.dobbin"), "--workers", "3")
    try:
        with BrokerClient(address, timeout=TIMEOUT) as client:
            assert client.root is None
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()
    assert process.serving_line.endswith(", 3 workers)\n")


def test_parser_and_app_loading(capsys):
    args = build_parser().parse_args(["serve", "x.dobbin"])
    assert args.bind.startswith("tcp://127.0.0.1:")
    assert args.workers == 2
    assert build_parser().parse_args(["serve", "x", "--workers", "5"]).workers == 5
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "x", "--workers", bad])
        assert "positive integer" in capsys.readouterr().err
    assert load_app("os.path:join") is __import__("os").path.join
    for spec, message in [("nocolon", "MODULE:FUNCTION"), ("no_such_module:f", "cannot import"),
                          ("os:no_such_function", "has no function"),
                          ("os:sep", "has no function")]:
        with pytest.raises(SystemExit, match=message):
            load_app(spec)
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def _two_commits(path, first):
    """A file of two commits to one root: `first` (a dict of items), then b=2."""
    with Database(path) as db:
        root = PersistentDict()
        checkout(root)
        db.elect(root)
        root.update(first)
        transaction.commit()
        checkout(root)
        root["b"] = 2
        transaction.commit()


def test_verify_reports_a_sound_file_and_a_damaged_one(tmp_path):
    path = str(tmp_path / "v.dobbin")
    _two_commits(path, {"a": 1})
    assert main(["verify", path]) == 0
    flip_bit(path, 100)  # inside the first record, which the second vouches for
    assert main(["verify", path]) == 1
    assert main(["verify", str(tmp_path / "missing.dobbin")]) == 1


def test_verify_names_the_file_by_its_full_path_whether_it_opens_or_not(tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    _two_commits("sound.dobbin", {"a": 1})
    (tmp_path / "other.txt").write_bytes(b"not a database")
    for name, code in [("sound.dobbin", 0), ("other.txt", 1), ("missing.dobbin", 1)]:
        capsys.readouterr()
        assert main(["verify", name]) == code
        assert json.loads(capsys.readouterr().out)["path"] == str(tmp_path / name)


def test_verify_tells_an_incomplete_last_record_from_damage(tmp_path, capsys):
    path = str(tmp_path / "t.dobbin")
    _two_commits(path, {"a": 1})
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.write(b"DTXRC\0\0\0" + bytes(30))  # a writer died inside its record header
    capsys.readouterr()
    assert main(["verify", path]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["incomplete_tail"] == {"offset": size, "bytes": 38}
    assert report["committed"] == 2 and report["errors"] == []


def test_verify_reports_a_damaged_checkpoint_it_stepped_over(tmp_path):
    path = str(tmp_path / "c.dobbin")
    _two_commits(path, {"payload": "x" * 300_000})  # big enough to bring a checkpoint
    log = Log(path, read_only=True)
    checkpoints = [record.offset for record in log.follow() if record.status == CHECKPOINT]
    log.close()
    assert checkpoints, "no checkpoint written: nothing to test"
    flip_bit(path, checkpoints[0] + 120)  # inside the index it carries
    with Database(path) as db:
        report = db.verify()
        assert db.root["b"] == 2  # nothing lost
    assert not report["ok"]
    assert any("checkpoint at offset %d" % checkpoints[0] in e for e in report["errors"])
    assert main(["verify", path]) == 1


def test_history_lists_the_latest_transactions_newest_first(tmp_path, capsys):
    path = str(tmp_path / "h.dobbin")
    _two_commits(path, {"a": 1})
    with Database(path) as db:
        checkout(db.root)
        db.root["c"] = 3
        txn = transaction.get()
        txn.user = "ann"
        txn.note("set c")
        txn.setExtendedInfo("ticket", 42)
        transaction.commit()
    capsys.readouterr()
    assert main(["history", path, "-n", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["tid"] for line in lines] == [3, 2]
    assert (lines[0]["user"], lines[0]["description"], lines[0]["extension"]) == (
        "ann", "set c", {"ticket": 42})
    assert lines[1]["description"] == "" and lines[0]["time"].endswith("Z")
    assert main(["history", str(tmp_path / "missing.dobbin")]) == 1
    assert "missing.dobbin" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["history", path, "-n", "0"])


def make_fifo(path):
    os.mkfifo(path)


def make_text(path):
    with open(path, "w") as text:
        text.write("not a Dobbin file, only some text longer than its header" * 2)


@pytest.mark.parametrize("command", ["serve", "verify", "history"])
@pytest.mark.parametrize("make, message", [
    (make_fifo, "not a regular file"),
    (os.mkdir, "not a "),
    (make_text, "not a Dobbin file"),
    (None, "thing"),  # the path, with what is wrong with it
])
def test_a_path_that_is_no_database_gets_a_message_not_a_hang_or_traceback(
        tmp_path, command, make, message):
    # A FIFO hung verify and history for ever; serve printed tracebacks.
    path = str(tmp_path / "thing")
    if make is None:
        path = str(tmp_path / "no-such-directory" / "thing")
    else:
        make(path)
    argv = [sys.executable, "-m", "dobbin", command, path]
    if command == "serve":
        argv += ["--bind", "tcp://127.0.0.1:*"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())
    assert done.returncode == 1
    assert message in done.stdout + done.stderr and "Traceback" not in done.stderr


def _failed_run(argv):
    done = subprocess.run([sys.executable, "-m", "dobbin"] + argv, capture_output=True,
                          text=True, timeout=60, env=child_env(), stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_serve_refuses_a_bad_address_or_app_before_making_the_file(tmp_path):
    path = tmp_path / "never.dobbin"
    assert "bogus://x" in _failed_run(["serve", str(path), "--bind", "bogus://x"])
    assert "dobbin serve: --app no_such_module:f: cannot import" in _failed_run(
        ["serve", str(path), "--app", "no_such_module:f"])
    assert "0 to 65535" in _failed_run(["serve", str(path), "--bind", "tcp://127.0.0.1:70000"])
    assert "0 to 65535" in _failed_run(["serve", str(path), "--bind", "tcp://127.0.0.1:*",
                                        "--broadcast", "tcp://127.0.0.1:99999"])
    assert os.listdir(tmp_path) == []


def test_serve_reports_an_os_error_of_the_server_as_a_message(tmp_path, monkeypatch, capsys):
    # Such as its secret file, in a directory it may not write (as root,
    # which may write anywhere, the error is made up).
    from broker.server import BrokerServer

    def refused(server):
        raise PermissionError(13, "Permission denied", str(tmp_path / "db.dobbin.secret.tmp"))

    monkeypatch.setattr(BrokerServer, "start", refused)
    assert main(["serve", str(tmp_path / "db.dobbin"), "--bind", "tcp://127.0.0.1:*"]) == 1
    assert "dobbin serve: [Errno 13] Permission denied" in capsys.readouterr().err


def test_shell_refuses_a_timeout_that_is_not_a_positive_number(capsys):
    for bad in ("-1", "0", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["shell", "tcp://127.0.0.1:1", "--timeout", bad])
        assert "positive number of seconds" in capsys.readouterr().err
    assert build_parser().parse_args(["shell", "x", "--timeout", "0.5"]).timeout == 0.5


def test_serving_a_database_at_an_ipc_path_naming_it_leaves_it_whole(tmp_path):
    # ZeroMQ deletes whatever a bound ipc:// path names: the database too.
    path = tmp_path / "db.dobbin"
    make_database(str(path)).close()
    before = path.read_bytes()
    stderr = _failed_run(["serve", str(path), "--bind", "ipc://%s" % path])
    assert "is not a socket" in stderr
    assert path.read_bytes() == before


def test_serve_reports_an_address_in_use_and_shell_a_silent_server(tmp_path):
    path = str(tmp_path / "db.dobbin")
    process, address = start_serving(path)
    try:
        stderr = _failed_run(["serve", str(tmp_path / "other.dobbin"), "--bind", address])
        assert "cannot bind" in stderr and address in stderr
        # The database it made for the run, and its secret, went with it.
        assert sorted(os.listdir(tmp_path)) == ["db.dobbin", "db.dobbin.broker-secret"]
        # One that was there before stays.
        stderr = _failed_run(["serve", path, "--bind", address])
        assert "cannot bind" in stderr
        assert sorted(os.listdir(tmp_path)) == ["db.dobbin", "db.dobbin.broker-secret"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        process.stdout.close()
        process.stderr.close()
    # Nothing answers there now.
    assert "no reply" in _failed_run(["shell", address, "--timeout", "0.2"])
