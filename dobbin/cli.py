"""The `dobbin` command line (also `python -m dobbin`).

    dobbin serve PATH [--bind ADDR] [--app MODULE:FUNCTION] [--debug]
        Serve the database at PATH (created if new) with the broker until
        SIGINT or SIGTERM, then shut down cleanly.  --app names a function
        called with the BrokerServer before it starts, to export classes
        and add statics.  Prints one line, "serving PATH at ADDR", once the
        server answers.
    dobbin shell ADDR
        An interactive Python prompt with `client` (a BrokerClient) and
        `root` (its root proxy) bound.
    dobbin verify PATH
        Check every record's checksums and the index; print the report and
        exit 0 if the file is sound, 1 if not.
    dobbin history PATH [-n N]
        Print what the latest N committed transactions recorded of
        themselves (tid, UTC time, user, description, extension), newest
        first, one JSON object per line.
"""

import argparse
import code
import importlib
import json
import os
import signal
import sys
import threading
import time

DEFAULT_BIND = "tcp://127.0.0.1:5590"


def build_parser():
    parser = argparse.ArgumentParser(prog="dobbin", description="Dobbin object database")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a database over ZeroMQ")
    serve.add_argument("path", help="database file (created if missing)")
    serve.add_argument("--bind", default=DEFAULT_BIND,
                       help="request endpoint (default %(default)s; tcp://HOST:* for any port)")
    serve.add_argument("--broadcast", default=None, help="broadcast (PUB) endpoint")
    serve.add_argument("--app", default=None, metavar="MODULE:FUNCTION",
                       help="called with the server before it starts, to configure exports")
    serve.add_argument("--durability", choices=("fsync", "none"), default="fsync")
    serve.add_argument("--debug", action="store_true", help="send server tracebacks to clients")
    serve.add_argument("--workers", type=_positive_int, default=2,
                       help="worker threads for calls, searches and large or slow commits"
                            " (default %(default)s)")
    shell = commands.add_parser("shell", help="interactive prompt on a served database")
    shell.add_argument("address", help="the server's request endpoint")
    shell.add_argument("--timeout", type=_positive_seconds, default=2.5,
                       help="seconds to wait for each reply (default %(default)s)")
    verify = commands.add_parser("verify", help="check a database file's checksums and index")
    verify.add_argument("path", help="database file")
    history = commands.add_parser("history", help="list the latest committed transactions")
    history.add_argument("path", help="database file")
    history.add_argument("-n", dest="limit", type=_positive_int, default=20,
                         help="how many (default %(default)s)")
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("wants a positive integer, not %r" % text)
    return value


def _positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):  # nan compares false
        raise argparse.ArgumentTypeError("wants a positive number of seconds, not %r" % text)
    return value


def load_app(spec):
    """Return the function named by "module:function"; SystemExit with a
    message if there is none."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise SystemExit("dobbin serve: --app wants MODULE:FUNCTION, got %r" % spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit("dobbin serve: --app %s: cannot import %s: %s"
                         % (spec, module_name, error)) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SystemExit("dobbin serve: --app %s: %s has no function %s"
                         % (spec, module_name, function_name))
    return function


def serve(args):
    from broker.exc import BrokerError
    from broker.server import BrokerServer
    from broker.endpoints import broadcast_address_for, check_bindable
    from dobbin.database import Database
    from dobbin.exc import DobbinError

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    # What can be checked before the database file is created, is: a run
    # that fails leaves nothing behind (but what another made meanwhile).
    configure = load_app(args.app) if args.app else None
    try:
        check_bindable(args.bind)
        check_bindable(broadcast_address_for(args.bind) if args.broadcast is None
                       else args.broadcast)
        db = Database(args.path, durability=args.durability)
    except (BrokerError, DobbinError, OSError) as error:
        print("dobbin serve: %s" % error, file=sys.stderr)
        return 1
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = BrokerServer(db, address=args.bind, broadcast=args.broadcast, debug=args.debug,
                              workers=args.workers)
        if configure is not None:
            configure(server)
        with server:
            print("serving %s at %s (broadcasts at %s, %d workers)"
                  % (args.path, server.address, server.broadcast_address, server.workers),
                  flush=True)
            while not stop.wait(0.5):
                pass
    except (BrokerError, OSError) as error:  # OSError: its secret file, say
        print("dobbin serve: %s" % error, file=sys.stderr)
        return 1
    finally:
        db.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def shell(args):
    from broker.client import BrokerClient
    from broker.exc import BrokerError

    try:
        client = BrokerClient(args.address, timeout=args.timeout)
    except BrokerError as error:
        print("dobbin shell: %s" % error, file=sys.stderr)
        return 1
    try:
        try:
            root = client.root
        except BrokerError as error:
            print("dobbin shell: %s" % error, file=sys.stderr)
            return 1
        banner = ("Dobbin shell on %s: `client` and `root` are bound; "
                  "client.commit() sends your changes." % args.address)
        code.interact(banner=banner, local={"client": client, "root": root}, exitmsg="")
    finally:
        client.close()
    return 0


def verify(args):
    from dobbin.database import Database
    from dobbin.exc import DobbinError

    try:
        with Database(args.path, read_only=True) as db:
            report = db.verify()
    except (DobbinError, OSError) as error:
        report = {"path": os.path.abspath(args.path), "ok": False, "errors": [str(error)]}
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report["ok"] else 1


def history(args):
    from dobbin.database import Database
    from dobbin.exc import DobbinError

    try:
        with Database(args.path, read_only=True) as db:
            found = db.recent_transactions(args.limit)
    except (DobbinError, OSError) as error:
        print("dobbin history: %s" % error, file=sys.stderr)
        return 1
    for info in found:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(info.time))
        print(json.dumps({"tid": info.tid, "time": "%s.%06dZ" % (stamp, info.time % 1 * 1e6),
                          "user": info.user, "description": info.description,
                          "extension": info.extension}, sort_keys=True))
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"serve": serve, "shell": shell, "verify": verify, "history": history}
    return commands[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
