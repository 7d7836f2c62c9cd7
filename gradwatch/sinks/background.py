"""``BackgroundWriter``: one daemon thread that writes what a sink hands it; the caller never waits.

A sink's writer can be slow (a network file system, a remote logger) or hang altogether (an
``add_*`` call that never returns). Training must not notice either: :meth:`BackgroundWriter.submit`
only appends to a backlog bounded in bytes and returns at once. When the writer falls so far behind
that the backlog exceeds its budget, the **oldest** waiting items are dropped (and counted in
:attr:`BackgroundWriter.dropped`): what the writer writes once it catches up is the newest state,
and the last flush before ``close()`` is always kept. :meth:`BackgroundWriter.close` writes what is
waiting and waits a bounded time: a hung writer delays ``close()`` (and interpreter exit) by at most
that timeout, then its thread is abandoned (it is a daemon thread).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np


class BackgroundWriter:
    """Calls ``handle(batch, final)`` on a daemon thread with the items submitted so far.

    Example:
        >>> written = []
        >>> writer = BackgroundWriter(lambda batch, final: written.extend(batch), name="demo")
        >>> writer.submit("a", size=1)
        >>> writer.close(timeout=5.0)
        True
        >>> written
        ['a']

    Args:
        handle: Writes a batch of items, oldest first; ``final`` is True for the last call (after
            :meth:`close`), where it should also flush or close its writer. Exceptions it raises
            are kept in :attr:`error` and the thread goes on.
        name: The thread's name.
        max_bytes: Budget of the backlog (by the sizes given to :meth:`submit`); the newest item
            is always kept, whatever its size.

    Attributes:
        dropped: Items dropped because the backlog exceeded its budget.
        error: The last exception ``handle`` raised, if any.
    """

    def __init__(
        self, handle: Callable[[list[Any], bool], None], *, name: str, max_bytes: int = 2**26
    ) -> None:
        self.dropped = 0
        self.error: Exception | None = None
        self._handle = handle
        self._max_bytes = max_bytes
        self._items: deque[tuple[Any, int]] = deque()
        self._bytes = 0
        self._busy = False
        self._stopping = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Items submitted and not yet handed to ``handle``."""
        with self._condition:
            return len(self._items)

    def submit(self, item: Any, size: int) -> None:
        """Queues ``item`` (never blocks); drops the oldest waiting items beyond the budget."""
        with self._condition:
            if self._stopping:
                return
            self._items.append((item, size))
            self._bytes += size
            while self._bytes > self._max_bytes and len(self._items) > 1:
                _, old_size = self._items.popleft()
                self._bytes -= old_size
                self.dropped += 1
            self._condition.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Waits until everything submitted so far is handled; False if ``timeout`` s passed."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._items and not self._busy, timeout)

    def close(self, timeout: float) -> bool:
        """Handles what is waiting, makes the final call and ends the thread.

        Returns:
            Whether the thread finished within ``timeout`` seconds (False: the writer hangs; its
            waiting items are never written).
        """
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if threading.current_thread() is self._thread:
            return True  # closed from inside ``handle`` (e.g. by garbage collection): it ends next
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        final = False
        while not final:
            with self._condition:
                self._condition.wait_for(lambda: bool(self._items) or self._stopping)
                batch = [item for item, _ in self._items]
                self._items.clear()
                self._bytes = 0
                final = self._stopping
                self._busy = True
            try:
                self._handle(batch, final)
            except Exception as error:  # the sink reports it; the thread must not die silently
                self.error = error
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()


def approximate_nbytes(value: Any) -> int:
    """Rough host memory of a record: numpy arrays by size, containers and dataclasses walked."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(approximate_nbytes(v) for v in value.values()) + 64
    if isinstance(value, list | tuple):
        if value and isinstance(value[0], int | float):  # e.g. histogram bucket limits
            return 8 * len(value) + 64
        return sum(approximate_nbytes(v) for v in value) + 64
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(approximate_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 32
