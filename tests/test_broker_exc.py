"""broker.exc: errors cross the wire as type name and message, and come back typed."""

import pytest

from broker import exc


def roundtrip(error, tb=None):
    return exc.from_wire(exc.to_wire(error, tb))


def test_conflict_keeps_key_and_field():
    error = roundtrip(exc.ConflictError(key="oid 3", field="name"))
    assert type(error) is exc.ConflictError
    assert (error.key, error.field) == ("oid 3", "name")
    assert "oid 3" in str(error) and "'name'" in str(error)


@pytest.mark.parametrize("cls", [exc.AccessDenied, exc.ProtocolError, exc.ReadConflictError,
                                 exc.NoResultError, exc.MultipleResultsError])
def test_broker_errors_keep_their_class(cls):
    assert type(roundtrip(cls("message"))) is cls


def test_builtin_errors_map_to_remote_subclasses():
    key_error = roundtrip(KeyError("missing"))
    assert isinstance(key_error, KeyError) and isinstance(key_error, exc.RemoteError)
    assert "missing" in str(key_error)
    attribute_error = roundtrip(AttributeError("nope"))
    assert isinstance(attribute_error, AttributeError)


def test_other_errors_become_remote_errors_without_traceback():
    error = roundtrip(ValueError("bad value"))
    assert type(error) is exc.RemoteError
    assert (error.type_name, error.message) == ("ValueError", "bad value")
    assert error.remote_traceback is None


def test_traceback_is_carried_when_given():
    assert roundtrip(ValueError("x"), "Traceback ...").remote_traceback == "Traceback ..."


def test_conflict_is_transient():
    from transaction.interfaces import TransientError
    assert issubclass(exc.ConflictError, TransientError)


def test_to_wire_bounds_what_a_request_put_into_an_error():
    huge = "x" * 100_000
    wire = exc.to_wire(exc.ConflictError(key="oid 3", field=huge))
    assert len(wire["message"]) < 1100 and wire["message"].endswith("characters)")
    assert wire["info"]["key"] == "oid 3" and len(wire["info"]["field"]) < 1100
    assert len(exc.to_wire(KeyError(b"\0" * 100_000))["message"]) < 1100
    small = exc.to_wire(exc.ConflictError(key="oid 3", field="name"))
    assert small["info"] == {"key": "oid 3", "field": "name"}


def test_wrong_use_of_the_client_raises_ours_and_the_builtin_error():
    from broker.client import BrokerClient

    for kwargs, ours, builtin in [({"spin": "fast"}, exc.InvalidTypeError, TypeError),
                                  ({"spin": -1}, exc.InvalidValueError, ValueError),
                                  ({"timeout": 0}, exc.InvalidValueError, ValueError),
                                  ({"retries": -1}, exc.InvalidValueError, ValueError)]:
        with pytest.raises(ours) as info:
            BrokerClient("tcp://127.0.0.1:1", **kwargs)
        assert isinstance(info.value, builtin) and isinstance(info.value, exc.BrokerError)
