"""The sink interface."""

from __future__ import annotations

from gradwatch.engine.records import FlushRecord


class Sink:
    """Receives one :class:`~gradwatch.record.FlushRecord` per flush, on rank 0 only.

    A sink that raises is disabled by the watch after one warning; training goes on.
    """

    def write(self, record: FlushRecord) -> None:
        """Writes one flush."""
        raise NotImplementedError

    def close(self) -> None:
        """Flushes and releases resources; called once by ``GradWatch.close``."""
