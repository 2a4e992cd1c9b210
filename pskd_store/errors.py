"""The store's exceptions, in a module of their own so that every store module can raise
them without importing another (store, staging and writer all do)."""

from __future__ import annotations


class StoreError(ValueError):
    """Bad use of a store: the message names the problem and the fix."""


class StoreNotFoundError(StoreError):
    """No store where one was asked for (a new run creates it there)."""


class StoreExistsError(StoreError):
    """A new store was asked for where one already is (``overwrite=True`` replaces it)."""


class EpochNotSealedError(StoreError, KeyError):
    """An epoch was asked for that was never sealed (or was pruned)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class StoreDamagedError(StoreError):
    """Stored bytes that are not what was written (a checksum, a missing chunk, edited
    metadata): nothing of the damaged rows is ever returned as a value."""


def os_problem(err: OSError, where: object) -> str:
    """An operating-system error as '<what went wrong> (<path>)'. A write to an open file
    (a full disk) carries no file name: ``where`` names the file or directory instead."""
    return f"{err.strerror or err} ({err.filename or where})"
