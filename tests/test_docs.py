"""Run the narrative documents in docs/*.txt as doctests."""

import doctest
import pathlib

import pytest
import transaction

DOCS = sorted((pathlib.Path(__file__).parent.parent / "docs").glob("*.txt"))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.IGNORE_EXCEPTION_DETAIL


@pytest.mark.parametrize("path", DOCS, ids=[path.name for path in DOCS])
def test_narrative(path, tmp_path):
    transaction.abort()
    globs = {"transaction": transaction, "database_path": str(tmp_path / "test.dobbin"),
             "tmpdir": str(tmp_path)}
    try:
        result = doctest.testfile(str(path), module_relative=False, globs=globs,
                                  optionflags=FLAGS, report=True, verbose=False)
    finally:
        transaction.abort()
    assert result.attempted > 0, "%s has no examples" % path.name
    assert result.failed == 0, "%d of %d examples failed in %s" % (
        result.failed, result.attempted, path.name)
