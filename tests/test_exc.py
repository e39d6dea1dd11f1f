"""dobbin.exc: wrong use of the API is refused with an error of ours, which
is also the built-in error Python code expects (TypeError, ValueError)."""

import io

import pytest
import transaction

from dobbin import exc
from dobbin.btree import OOBTree
from dobbin.database import Database
from dobbin.persistent import Persistent, PersistentFile, checkout


@pytest.fixture
def db(tmp_path):
    database = Database(str(tmp_path / "exc.dobbin"))
    yield database
    transaction.abort()
    database.close()


def misuses(db, tmp_path):
    """(call, the error of ours it raises, the built-in one it also is)."""
    target = str(tmp_path / "copy.dobbin")
    return [
        (lambda: Database(target, cache_size="big"), exc.InvalidTypeError, TypeError),
        (lambda: Database(target, cache_size=0), exc.InvalidValueError, ValueError),
        (lambda: Database(target, durability="sometimes"), exc.InvalidValueError, ValueError),
        (lambda: db.elect(object()), exc.InvalidTypeError, TypeError),
        (lambda: db.load_state(1, tid=-1), exc.InvalidValueError, ValueError),
        (lambda: db.snapshot(Database(target), until=-5), exc.InvalidValueError, ValueError),
        (lambda: checkout(42), exc.InvalidTypeError, TypeError),
        (lambda: PersistentFile(42), exc.InvalidTypeError, TypeError),
        (lambda: OOBTree().minKey(), exc.InvalidValueError, ValueError),
        (lambda: Database(target, lock_timeout="soon"), exc.InvalidTypeError, TypeError),
        (lambda: Database(target, lock_timeout=-1), exc.InvalidValueError, ValueError),
    ]


def test_wrong_use_raises_ours_and_the_builtin_error(db, tmp_path):
    db.elect(Persistent())
    transaction.commit()
    for call, ours, builtin in misuses(db, tmp_path):
        with pytest.raises(ours) as info:
            call()
        assert isinstance(info.value, builtin) and isinstance(info.value, exc.DobbinError)
        assert str(info.value)


def test_a_stream_read_the_wrong_way_raises_ours(db):
    db.elect(Persistent())
    transaction.commit()
    checkout(db.root)
    db.root.file = PersistentFile(io.BytesIO(b"abc"))
    transaction.commit()
    stream = db.root.file
    with pytest.raises(exc.InvalidTypeError):
        stream.read_at("0")
    stream.open()
    with pytest.raises(exc.InvalidValueError):
        stream.seek(-1)
