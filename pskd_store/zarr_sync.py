"""Running zarr's asynchronous store calls from synchronous code.

zarr's stores are asynchronous, and zarr has no public function that runs a coroutine on
its own event loop (where an object store's client lives); ``zarr.core.sync.sync`` does. It
is this package's one import from zarr's internals, kept here so that a zarr release that
moves it changes one line, and ``setup.cfg`` admits only the zarr releases the tests ran on.
"""

from zarr.core.sync import sync

__all__ = ["sync"]
