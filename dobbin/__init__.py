"""Dobbin: an embedded transactional object database.

Start with `dobbin.database.Database` and `dobbin.persistent`; the
contracts are in `dobbin.interfaces`, the file format in docs/format.txt.
"""

__version__ = "0.1.0"
