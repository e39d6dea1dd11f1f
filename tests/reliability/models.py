"""Persistent classes stored by the reliability tests.

They live in an importable module (not in a test file) because states
name their class, and the worker processes of the kill tests must store
and load the same classes as the test that checks their work.
"""

from dobbin.persistent import Persistent


class Item(Persistent):
    """A small object hanging off the root."""

    def __init__(self, name, payload=b""):
        self.name = name
        self.payload = payload


class Account(Persistent):
    """A bank account: transfers move money, the total never changes."""

    def __init__(self, number, balance):
        self.number = number
        self.balance = balance


class Progress(Persistent):
    """The last transfer a worker incarnation committed."""

    def __init__(self):
        self.seq = 0
