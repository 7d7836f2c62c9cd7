"""Mailbox: each step's detection rows on the host within a step, without waiting for the device.

The step-cadence detectors answer on the device. To tell the user within a step or two, the engine
packs the fired flag and the value of every warning/error detection of a step into one small
tensor and posts it here. On CUDA it is copied with
``copy_(non_blocking=True)`` into a pinned host buffer and a ``torch.cuda.Event`` is recorded
after the copy; :meth:`Mailbox.collect` returns only the rows whose event has completed
(``Event.query()``, never a wait), so a row arrives at the first ``step()`` after the device has
finished that step, normally the next one. On the CPU the copy is a plain memory copy and the
row is readable at once, in the same step. The host reads the buffer through its numpy view: no
``.item()``, ``.tolist()``, ``.cpu()`` or ``.numpy()`` call on the hot path.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradwatch.engine.thresholds import MAILBOX_DEPTH


@dataclass
class _Letter:
    step: int
    buffer: torch.Tensor  # host memory (pinned on CUDA)
    array: np.ndarray  # numpy view of ``buffer``
    event: Any  # torch.cuda.Event recorded after the copy, None on the CPU


class Mailbox:
    """Non-blocking delivery of small per-step device tensors to the host.

    Example:
        >>> box = Mailbox(torch.device("cpu"))
        >>> box.post(7, torch.tensor([1.0, 2.5]))
        >>> [(step, row.tolist()) for step, row in box.collect()]
        [(7, [1.0, 2.5])]

    Args:
        device: Where the posted tensors live (``cpu`` or ``cuda``).
        depth: Copies that may be in flight at once (CUDA); posting one more waits for the oldest.

    Raises:
        ValueError: A device that is neither the CPU nor CUDA (see :meth:`supports`).
    """

    def __init__(self, device: torch.device, depth: int = MAILBOX_DEPTH) -> None:
        if not self.supports(device):
            raise ValueError(f"the mailbox needs a cpu or cuda device, got {device}")
        self.device = device
        self.depth = depth
        self._cuda = device.type == "cuda"
        self._size = -1
        self._free: list[tuple[torch.Tensor, np.ndarray]] = []
        self._in_flight: deque[_Letter] = deque()

    @staticmethod
    def supports(device: torch.device) -> bool:
        """Whether rows from ``device`` can be delivered without a sync (CPU and CUDA)."""
        return device.type in ("cpu", "cuda")

    def post(self, step: int, row: torch.Tensor) -> None:
        """Starts copying ``row`` (1-d, any real dtype) of ``step`` to the host."""
        size = row.numel()
        if size != self._size:  # first post, or the layout changed
            self._size = size
            self._free = []
        if self._cuda and len(self._in_flight) >= self.depth:
            self._in_flight[0].event.synchronize()  # long finished on the device's timeline
        buffer, array = self._free.pop() if self._free else self._allocate(size)
        buffer.copy_(row, non_blocking=self._cuda)
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self._in_flight.append(_Letter(step, buffer, array, event))

    def collect(self) -> list[tuple[int, np.ndarray]]:
        """The rows whose copy has landed, oldest first, as ``(step, row)``; never waits."""
        out = []
        while self._in_flight:
            letter = self._in_flight[0]
            if letter.event is not None and not letter.event.query():
                break
            self._in_flight.popleft()
            out.append((letter.step, letter.array.copy()))
            if len(letter.array) == self._size:
                self._free.append((letter.buffer, letter.array))
        return out

    def clear(self) -> None:
        """Forgets the rows in flight (their steps were materialised another way)."""
        self._in_flight.clear()

    def _allocate(self, size: int) -> tuple[torch.Tensor, np.ndarray]:
        array = np.zeros(size, dtype=np.float32)
        if not self._cuda:
            return torch.from_numpy(array), array
        buffer = torch.zeros(size, dtype=torch.float32, pin_memory=True)
        return buffer, buffer.numpy()  # a view, made once per buffer, off the hot path
