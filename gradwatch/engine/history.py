"""History: a fixed-size ring buffer of per-layer norms on the device, mirrored at flush."""

from __future__ import annotations

import numpy as np
import torch


class NormHistory:
    """The last ``window`` steps of per-layer gradient norms, total norm, clip coefficient and
    learning-rate scale.

    Rows are written on the device every step (no sync). :meth:`pending` returns the rows written
    since the last flush as device tensors, ready to be packed into the one host transfer, and
    :meth:`commit` stores their host copy in the mirror that :meth:`as_dict` reads.

    Args:
        window: Number of steps retained.
        num_layers: Number of layers (columns).
        device: Where the ring lives.
    """

    def __init__(self, window: int, num_layers: int, device: torch.device) -> None:
        self.window = window
        self.num_layers = num_layers
        self._norms = torch.full((window, num_layers), float("nan"), device=device)
        self._total = torch.full((window,), float("nan"), device=device)
        # clip coefficient and learning-rate scale: 1 until a remedy writes one (then every step)
        self._clip = torch.ones(window, device=device)
        self._lr_scale = torch.ones(window, device=device)
        self._clip_written = False
        self._lr_scale_written = False
        self._steps: list[int] = []  # steps of rows not yet committed
        self._written = 0  # rows written since the start
        self.host_steps = np.zeros(0, dtype=np.int64)
        self.host_norms = np.zeros((0, num_layers), dtype=np.float32)
        self.host_total = np.zeros(0, dtype=np.float32)
        self.host_clip = np.zeros(0, dtype=np.float32)
        self.host_lr_scale = np.zeros(0, dtype=np.float32)

    def write(
        self,
        step: int,
        norms: torch.Tensor,
        total: torch.Tensor,
        clip_coef: torch.Tensor | None,
        lr_scale: torch.Tensor | float | None,
    ) -> None:
        """Stores one step's values (device-side copies, no sync); None means 1."""
        row = self._written % self.window
        self._norms[row].copy_(norms)
        self._total[row].copy_(total)
        if clip_coef is not None:
            self._clip[row].copy_(clip_coef)
            self._clip_written = True
        elif self._clip_written:
            self._clip[row].fill_(1.0)
        if isinstance(lr_scale, torch.Tensor):
            self._lr_scale[row].copy_(lr_scale)
            self._lr_scale_written = True
        elif self._lr_scale_written or lr_scale not in (None, 1.0):
            self._lr_scale[row].fill_(1.0 if lr_scale is None else lr_scale)
            self._lr_scale_written = True
        self._steps.append(step)
        self._written += 1
        if len(self._steps) > self.window:  # never committed (no flush yet): keep the newest
            del self._steps[0]

    @property
    def num_pending(self) -> int:
        """Rows written since the last commit."""
        return len(self._steps)

    @property
    def pending_steps(self) -> list[int]:
        """Step numbers of the rows written since the last commit."""
        return list(self._steps)

    def pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Device views of the pending rows, oldest first: norms ``[k, L]``, scalars ``[k, 3]``
        (total norm, clip coefficient, learning-rate scale)."""
        k = len(self._steps)
        end = self._written % self.window
        start = (self._written - k) % self.window
        columns = (self._total, self._clip, self._lr_scale)
        if k == 0:
            return self._norms[:0], torch.stack([c[:0] for c in columns], 1)
        if start < end:
            return self._norms[start:end], torch.stack([c[start:end] for c in columns], 1)
        return (
            torch.cat([self._norms[start:], self._norms[:end]]),
            torch.stack([torch.cat([c[start:], c[:end]]) for c in columns], 1),
        )

    def commit(self, norms: np.ndarray, scalars: np.ndarray) -> None:
        """Appends the host copy of the pending rows to the mirror, keeping the last ``window``."""
        keep = self.window
        self.host_steps = np.concatenate([self.host_steps, np.asarray(self._steps)])[-keep:]
        self.host_norms = np.concatenate([self.host_norms, norms])[-keep:]
        self.host_total = np.concatenate([self.host_total, scalars[:, 0]])[-keep:]
        self.host_clip = np.concatenate([self.host_clip, scalars[:, 1]])[-keep:]
        self.host_lr_scale = np.concatenate([self.host_lr_scale, scalars[:, 2]])[-keep:]
        self._steps.clear()

    def remapped(self, columns: list[int | None], device: torch.device) -> NormHistory:
        """A history whose column ``j`` continues this one's column ``columns[j]`` (``None``: a new
        layer, NaN before it existed). Carries the committed window; pending rows are not carried
        (flush first)."""
        other = NormHistory(self.window, len(columns), device)
        norms = np.full((len(self.host_steps), len(columns)), np.nan, dtype=np.float32)
        for new, old in enumerate(columns):
            if old is not None:
                norms[:, new] = self.host_norms[:, old]
        other.host_steps = self.host_steps.copy()
        other.host_norms = norms
        other.host_total = self.host_total.copy()
        other.host_clip = self.host_clip.copy()
        other.host_lr_scale = self.host_lr_scale.copy()
        return other

    def as_dict(self, names: list[str]) -> dict[str, np.ndarray]:
        """The committed window: ``"step"`` and one norm array per layer name."""
        out: dict[str, np.ndarray] = {"step": self.host_steps.copy()}
        for column, name in enumerate(names):
            out[name] = self.host_norms[:, column].copy()
        return out

    def state_dict(self) -> dict:
        """Plain-value state of the committed window (flush first)."""
        return {
            "window": self.window,
            "steps": self.host_steps.tolist(),
            "norms": self.host_norms.tolist(),
            "total": self.host_total.tolist(),
            "clip": self.host_clip.tolist(),
            "lr_scale": self.host_lr_scale.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores the committed window into the mirror and the device ring."""
        self.host_steps = np.asarray(state["steps"], dtype=np.int64)[-self.window :]
        norms = np.asarray(state["norms"], dtype=np.float32).reshape(-1, self.num_layers)
        self.host_norms = norms[-self.window :]
        self.host_total = np.asarray(state["total"], dtype=np.float32)[-self.window :]
        self.host_clip = np.asarray(state["clip"], dtype=np.float32)[-self.window :]
        self.host_lr_scale = np.asarray(state["lr_scale"], dtype=np.float32)[-self.window :]
        k = len(self.host_steps)
        device = self._norms.device
        self._norms.fill_(float("nan"))
        self._total.fill_(float("nan"))
        self._clip.fill_(1.0)
        self._lr_scale.fill_(1.0)
        if k:
            self._norms[:k].copy_(torch.from_numpy(self.host_norms).to(device))
            self._total[:k].copy_(torch.from_numpy(self.host_total).to(device))
            self._clip[:k].copy_(torch.from_numpy(self.host_clip).to(device))
            self._lr_scale[:k].copy_(torch.from_numpy(self.host_lr_scale).to(device))
            self._clip_written = self._lr_scale_written = True
        self._written = k
        self._steps.clear()
