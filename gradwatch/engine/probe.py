"""The probe: per-layer sums of squares of gradients (or weights), one foreach pass, on device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradwatch.engine.distributed import all_reduce_sum_, is_sharded, local_part, replica_weight
from gradwatch.engine.layers import Layer

_DENSE, _SPARSE = 1, 2


@dataclass
class _Plan:
    """How to reduce one particular set of present tensors (cached by which ones are present)."""

    present: list[int]  # indices into GradientProbe.params
    groups: list[list[int]]  # positions in ``present``, one list per (device, dtype) dense group
    sparse: list[int]  # positions in ``present`` of sparse gradients
    layer_index: torch.Tensor  # [len(present)] layer of each value, in concatenation order
    weights: torch.Tensor | None  # replica weights in concatenation order (sharded models only)
    has_grad: torch.Tensor  # [L] bool


class GradientProbe:
    """Computes per-layer L2 norms of gradients and weights with ``torch._foreach_norm``.

    Tensors are grouped by device and dtype once per pattern of present gradients; each group is
    reduced with one ``_foreach_norm`` call accumulating in float32, sparse gradients fall back to
    a per-tensor norm. Per-tensor squares are summed into layers with ``index_add_``. Everything
    stays on the home device; sharded (DTensor) models are all-reduced once per call.

    Args:
        layers: The layers, in the order their values are reported.
        device: The home device where results live.
    """

    def __init__(self, layers: list[Layer], device: torch.device) -> None:
        self.device = device
        self.num_layers = len(layers)
        self.params: list[nn.Parameter] = [p for layer in layers for p in layer.params]
        self._param_layer = [i for i, layer in enumerate(layers) for _ in layer.params]
        self.sharded = any(is_sharded(p) for p in self.params)
        self._weights = [replica_weight(p) for p in self.params] if self.sharded else None
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._foreach_ok = True

    def grad_pattern(self) -> tuple[int, ...]:
        """Which parameters have a gradient now (0 none, 1 dense, 2 sparse)."""
        return tuple(
            0 if (grad := p.grad) is None else (_SPARSE if grad.is_sparse else _DENSE)
            for p in self.params
        )

    def knows(self, pattern: tuple[int, ...]) -> bool:
        """Whether this pattern of present gradients was seen (its plan is cached)."""
        return pattern in self._plans

    def grad_sq_norms(self, pattern: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer sums of squares of the current gradients, and the per-layer has-grad mask."""
        plan = self._plan(pattern)
        params = self.params
        if self.sharded:
            tensors = [local_part(params[i].grad) for i in plan.present]  # type: ignore[arg-type]
        else:
            tensors = [params[i].grad for i in plan.present]  # type: ignore[misc]
        return self._reduce(plan, tensors), plan.has_grad

    def weight_sq_norms(self) -> torch.Tensor:
        """Per-layer sums of squares of the parameters themselves."""
        plan = self._plan((_DENSE,) * len(self.params))
        with torch.no_grad():
            tensors = [local_part(p.detach()) for p in self.params]
            return self._reduce(plan, tensors)

    def reduce_tensors(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer sums of squares of arbitrary tensors shaped like the (local) parameters."""
        return self._reduce(self._plan((_DENSE,) * len(self.params)), tensors)

    def grads(self, pattern: tuple[int, ...]) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        """Parameters with a gradient and their local gradient tensors."""
        plan = self._plan(pattern)
        params = [self.params[i] for i in plan.present]
        return params, [local_part(p.grad) for p in params]  # type: ignore[arg-type]

    def _reduce(self, plan: _Plan, tensors: list[torch.Tensor]) -> torch.Tensor:
        parts = []
        for group in plan.groups:
            members = tensors if len(group) == len(tensors) else [tensors[j] for j in group]
            norms = torch.stack(self._foreach_norms(members))
            if norms.device != self.device or norms.dtype != torch.float32:
                norms = norms.to(self.device, torch.float32, non_blocking=True)
            parts.append(norms)
        if plan.sparse:
            sparse = torch.stack([_sparse_norm(tensors[j]) for j in plan.sparse])
            parts.append(sparse.to(self.device, torch.float32, non_blocking=True))
        sq = torch.zeros(self.num_layers, device=self.device, dtype=torch.float32)
        if not parts:
            return sq
        values = (parts[0] if len(parts) == 1 else torch.cat(parts)).square()
        if plan.weights is not None:
            values = values * plan.weights
        sq.index_add_(0, plan.layer_index, values)
        if self.sharded:
            all_reduce_sum_(sq)
        return sq

    def _foreach_norms(
        self, tensors: list[torch.Tensor]
    ) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
        dtype = accumulation_dtype(tensors[0].dtype)
        if self._foreach_ok:
            try:
                return torch._foreach_norm(tensors, 2, dtype=dtype)
            except (RuntimeError, TypeError, NotImplementedError):
                self._foreach_ok = False  # e.g. a backend without foreach kernels
        return [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]

    def _plan(self, pattern: tuple[int, ...]) -> _Plan:
        plan = self._plans.get(pattern)
        if plan is None:
            plan = self._build_plan(pattern)
            if len(self._plans) > 64:  # patterns should be few; never grow without bound
                self._plans.clear()
            self._plans[pattern] = plan
        return plan

    def _build_plan(self, pattern: tuple[int, ...]) -> _Plan:
        present = [i for i, kind in enumerate(pattern) if kind]
        dense = [pos for pos, i in enumerate(present) if pattern[i] != _SPARSE]
        sparse = [pos for pos, i in enumerate(present) if pattern[i] == _SPARSE]
        locals_ = [local_part(self.params[present[pos]]) for pos in dense]
        groups = [[dense[j] for j in group] for group in group_by_device_dtype(locals_)]
        order = [pos for group in groups for pos in group] + sparse
        layer_index = torch.tensor(
            [self._param_layer[present[pos]] for pos in order], dtype=torch.long, device=self.device
        )
        weights = None
        if self._weights is not None:
            weights = torch.tensor(
                [self._weights[present[pos]] for pos in order],
                dtype=torch.float32,
                device=self.device,
            )
        has_grad = torch.zeros(self.num_layers, dtype=torch.bool, device=self.device)
        has_grad[layer_index] = True
        return _Plan(present, groups, sparse, layer_index, weights, has_grad)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """Low-precision tensors accumulate in float32; float32/float64 keep their own precision, as
    complex tensors do (the norm of a complex tensor is real: that of the magnitudes)."""
    if dtype in (torch.float32, torch.float64) or dtype.is_complex:
        return None
    return torch.float32


def _sparse_norm(tensor: torch.Tensor) -> torch.Tensor:
    values = tensor.coalesce().values()
    return torch.linalg.vector_norm(values, dtype=accumulation_dtype(values.dtype))


def group_by_device_dtype(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), as foreach kernels need them."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    return list(groups.values())


def scale_(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiplies every tensor in place by the 0-d ``coef`` (on the device, no sync).

    One ``torch._foreach_mul_`` per (device, dtype) group, as ``clip_grad_norm_`` does.
    """
    for group in group_by_device_dtype(tensors):
        members = [tensors[i] for i in group]
        torch._foreach_mul_(members, coef.to(members[0].device, members[0].dtype))
