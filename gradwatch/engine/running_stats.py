"""Running statistics of normalisation layers: restored on a skipped step, checked at flushes.

A batch with a NaN poisons BatchNorm's running mean and variance during the *forward* pass, before
any gradient exists: skipping the update leaves them NaN, and every evaluation afterwards outputs
NaN. :class:`RunningStats` covers every ``BatchNorm*``/``SyncBatchNorm``/``InstanceNorm*`` with
``track_running_stats`` (``running_mean``, ``running_var``, ``num_batches_tracked``):

* with a skipping remedy, a forward pre-hook on the root module copies the buffers on the device
  before the first training forward of each step (one ``_foreach_copy_`` per dtype; gradient
  accumulation copies once per step, evaluation forwards never), and a skipped step puts the copy
  back with ``torch.where`` on the device skip flag (no host read): the buffers are bit for bit
  those of a run that never saw the batch;
* at every flush :meth:`RunningStats.nonfinite` says which layers hold a NaN/Inf statistic, so the
  watch can report it (packed into the flush's one transfer).

Buffers changed outside the root module's forward (e.g. ``torch.optim.swa_utils.update_bn``) are
not covered by the restore. Under data parallelism each rank restores its own buffers; the skip
decision is the same on every rank.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from gradwatch.engine.hooks import ForwardPreHook, Handles


class RunningStats:
    """The running statistics of ``model``'s normalisation layers.

    Args:
        model: The root module.
        restore: Snapshot before each step's first training forward, so :meth:`restore_where`
            can put the statistics back.
    """

    def __init__(self, model: nn.Module, *, restore: bool) -> None:
        self.names: list[str] = []
        self.buffers: list[torch.Tensor] = []
        owners: list[int] = []
        for name, module in model.named_modules():
            if isinstance(module, _NormBase) and module.track_running_stats:
                found = [
                    b
                    for b in (module.running_mean, module.running_var, module.num_batches_tracked)
                    if isinstance(b, torch.Tensor) and not isinstance(b, nn.UninitializedBuffer)
                ]
                if found:
                    owners += [len(self.names)] * len(found)
                    self.names.append(name)
                    self.buffers += found
        floats = [i for i, b in enumerate(self.buffers) if b.is_floating_point()]
        self._floats = [self.buffers[i] for i in floats]
        device = self._floats[0].device if self._floats else torch.device("cpu")
        self._float_owner = torch.tensor([owners[i] for i in floats], dtype=torch.long).to(device)
        self._model = weakref.ref(model)
        self._snapshots: list[torch.Tensor] = []
        self._fresh = False  # a snapshot of this step was taken
        self._armed = True
        self._handles = Handles(self)
        if restore and self.buffers:
            self._snapshots = [torch.empty_like(b) for b in self.buffers]
            hook = ForwardPreHook(self, RunningStats._before_forward, 0)
            self._handles.add(model.register_forward_pre_hook(hook))

    def __bool__(self) -> bool:
        return bool(self.buffers)

    def _before_forward(self, index: int, args: Any) -> None:
        model = self._model()
        if not self._armed or model is None or not model.training or not torch.is_grad_enabled():
            return
        self._armed = False
        try:
            with torch.no_grad():
                groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
                for i, buffer in enumerate(self.buffers):
                    groups.setdefault((buffer.device, buffer.dtype), []).append(i)
                for members in groups.values():
                    torch._foreach_copy_(
                        [self._snapshots[i] for i in members], [self.buffers[i] for i in members]
                    )
            self._fresh = True
        except Exception as error:  # never break the forward: stop snapshotting instead
            self._handles.remove()
            warnings.warn(
                f"gradwatch: cannot copy the normalisation layers' running statistics ({error!r}); "
                "skipped steps no longer restore them",
                RuntimeWarning,
                stacklevel=2,
            )

    def restore_where(self, skip: torch.Tensor) -> None:
        """Puts this step's snapshot back where ``skip`` (0-d device bool) is set; no host read.

        Without a snapshot of this step (no training forward since the last call) nothing changes.
        """
        if self._fresh:
            with torch.no_grad():
                for buffer, snapshot in zip(self.buffers, self._snapshots, strict=True):
                    torch.where(skip.to(buffer.device), snapshot, buffer, out=buffer)
        self._fresh = False
        self._armed = True

    def nonfinite(self) -> torch.Tensor:
        """``[M]`` device bool per normalisation layer: a running statistic is NaN or Inf."""
        bad = torch.zeros(len(self.names), dtype=torch.bool, device=self._float_owner.device)
        if self._floats:
            peaks = torch.stack(torch._foreach_norm(self._floats, float("inf"))).to(bad.device)
            bad.index_put_((self._float_owner,), ~torch.isfinite(peaks), accumulate=True)
        return bad

    def remove(self) -> None:
        """Removes the hook."""
        self._handles.remove()
