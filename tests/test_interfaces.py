"""Every implementation in dobbin provides the interface that documents it
(zope.interface's verifyClass and verifyObject: methods, signatures and
attributes)."""

import io

import pytest
import transaction
from zope.interface.verify import verifyClass, verifyObject

from dobbin import interfaces
from dobbin.database import Database
from dobbin.lock import WriteLock
from dobbin.log import Log
from dobbin.notify import Notifier
from dobbin.persistent import Persistent, PersistentDict, PersistentFile, checkout
from dobbin.session import Session, current_session
from dobbin.stream import PersistentStream

IMPLEMENTATIONS = [
    (interfaces.IPersistent, Persistent),
    (interfaces.IPersistentDict, PersistentDict),
    (interfaces.IPersistentFile, PersistentFile),
    (interfaces.IPersistentStream, PersistentStream),
    (interfaces.IDatabase, Database),
    (interfaces.ILog, Log),
    (interfaces.IWriteLock, WriteLock),
    (interfaces.INotifier, Notifier),
    (interfaces.ISession, Session),
]


def ids(value):
    return getattr(value, "__name__", None)


@pytest.mark.parametrize("interface, cls", IMPLEMENTATIONS, ids=ids)
def test_class_implements_its_interface(interface, cls):
    assert interface.implementedBy(cls)
    assert verifyClass(interface, cls)


@pytest.fixture
def instances(open_db):
    """One live instance of every implementation, from a real database."""
    db = open_db()
    root = Persistent()
    pdict = PersistentDict(a=1)
    checkout(root)
    root.pdict = pdict
    root.file = PersistentFile(io.BytesIO(b"abc"))
    db.elect(root)
    transaction.commit()
    checkout(root)  # a session joined to the current transaction
    return {
        Persistent: root,
        PersistentDict: pdict,
        PersistentFile: PersistentFile(io.BytesIO(b"abc")),
        PersistentStream: root.file,
        Database: db,
        Log: db._log,
        WriteLock: db._lock,
        Notifier: db._notifier,
        Session: current_session(),
    }


@pytest.mark.parametrize("interface, cls", IMPLEMENTATIONS, ids=ids)
def test_object_provides_its_interface(interface, cls, instances):
    obj = instances[cls]
    assert type(obj) is cls
    assert verifyObject(interface, obj)
