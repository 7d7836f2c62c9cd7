"""The probe: per-layer sums of squares of gradients (or weights), one foreach pass, on device."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import repeat

import torch
from torch import nn

from gradwatch.engine.distributed import (
    all_reduce_max_,
    all_reduce_sum_,
    is_sharded,
    local_part,
    replica_weight,
)
from gradwatch.engine.layers import Layer

_DENSE, _SPARSE = 1, 2
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")


@dataclass
class _Plan:
    """How to reduce one particular set of present tensors (cached by which ones are present)."""

    present: list[int]  # indices into GradientProbe.params
    groups: list[list[int]]  # positions in ``present``, one list per (device, dtype) dense group
    sparse: list[int]  # positions in ``present`` of sparse gradients
    layer_index: torch.Tensor  # [len(present)] layer of each value, in concatenation order
    weights: torch.Tensor | None  # replica weights in concatenation order (sharded models only)
    has_grad: torch.Tensor  # [L] bool
    in_present_order: torch.Tensor  # [len(present)] concatenation index of each present tensor
    in_torch_order: torch.Tensor  # concatenation indices in ``clip_grad_norm_``'s order


class GradientProbe:
    """Computes per-layer L2 norms of gradients and weights with ``torch._foreach_norm``.

    Tensors are grouped by device and dtype once per pattern of present gradients; each group is
    reduced with one ``_foreach_norm`` call accumulating in float32, sparse gradients fall back to
    a per-tensor norm. Per-tensor squares are summed into layers with ``index_add_``. Everything
    stays on the home device; sharded (DTensor) models are all-reduced once per call.

    The per-tensor norms of the last :meth:`grad_sq_norms` call are kept (in the precision they
    were computed in), so remedies get per-tensor and ``clip_grad_norm_``-exact total norms without
    another pass (:meth:`tensor_sq_norms`, :meth:`total_norm`).

    Args:
        layers: The layers, in the order their values are reported.
        device: The home device where results live.
        registration: The model's parameters in registration order (``model.parameters()``), the
            order ``clip_grad_norm_`` sums in; default the layers' order.
    """

    def __init__(
        self,
        layers: list[Layer],
        device: torch.device,
        registration: list[nn.Parameter] | None = None,
    ) -> None:
        self.device = device
        self.num_layers = len(layers)
        self.params: list[nn.Parameter] = [p for layer in layers for p in layer.params]
        self._param_layer = [i for i, layer in enumerate(layers) for _ in layer.params]
        self.sharded = any(is_sharded(p) for p in self.params)
        self._weights = [replica_weight(p) for p in self.params] if self.sharded else None
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._foreach_ok = True
        rank = {id(p): i for i, p in enumerate(registration or ())}
        self._rank = [rank.get(id(p), len(rank) + i) for i, p in enumerate(self.params)]
        self._last: tuple[_Plan, list[torch.Tensor]] | None = None  # last gradient norms
        self._all_dense = (_DENSE,) * len(self.params)

    def current_grads(self) -> list[torch.Tensor | None]:
        """The ``.grad`` of every watched parameter, in order (None where there is none)."""
        return list(map(_GRAD, self.params))  # a C-level loop: this runs at every step

    def grad_pattern(self, grads: list[torch.Tensor | None] | None = None) -> tuple[int, ...]:
        """Which parameters have a gradient now (0 none, 1 dense, 2 sparse).

        Args:
            grads: :meth:`current_grads`, if the caller already read them.
        """
        grads = self.current_grads() if grads is None else grads
        if not any(map(operator.is_, grads, repeat(None))) and not any(map(_IS_SPARSE, grads)):
            return self._all_dense
        return tuple(
            0 if grad is None else (_SPARSE if grad.is_sparse else _DENSE) for grad in grads
        )

    def knows(self, pattern: tuple[int, ...]) -> bool:
        """Whether this pattern of present gradients was seen (its plan is cached)."""
        return pattern in self._plans

    def grad_sq_norms(
        self, pattern: tuple[int, ...], grads: list[torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer sums of squares of the current gradients, and the per-layer has-grad mask.

        Args:
            pattern: :meth:`grad_pattern` of these gradients.
            grads: :meth:`current_grads`, if the caller already read them.
        """
        plan = self._plan(pattern)
        if grads is not None and pattern is self._all_dense and not self.sharded:
            tensors: list[torch.Tensor] = grads  # type: ignore[assignment]  # none is None
        else:
            tensors = self._grad_tensors(plan)
        parts = self._norm_parts(plan, tensors, 2.0)
        self._last = (plan, parts)
        return self._sum_squares(plan, parts), plan.has_grad

    def tensor_sq_norms(self, pattern: tuple[int, ...]) -> torch.Tensor:
        """``[P]`` float32 squared norms of the local gradients of the last :meth:`grad_sq_norms`
        call, in the order of :meth:`grads` (no pass over the gradients)."""
        plan = self._plan(pattern)
        parts = self._last[1] if self._last is not None and self._last[0] is plan else None
        if parts is None:
            parts = self._norm_parts(plan, self._grad_tensors(plan), 2.0)
        return _flat(parts, torch.float32)[plan.in_present_order].square()

    def total_norm(self, pattern: tuple[int, ...], norm_type: float) -> torch.Tensor:
        """The total ``norm_type`` norm of the current gradients, as ``clip_grad_norm_`` forms it.

        Per-tensor norms in the gradients' precision (float32 for lower precisions), taken in
        ``model.parameters()`` order grouped by device and dtype, then the norm of their stack:
        bit for bit ``torch.nn.utils.clip_grad_norm_``'s total for float32 and float64 models. The
        L2 norms of the last :meth:`grad_sq_norms` call are reused; another norm costs one read of
        the gradients. Sharded models: the norm of the full gradients (one collective).

        Args:
            pattern: The gradient pattern of this step.
            norm_type: ``2.0`` or ``inf``.
        """
        plan = self._plan(pattern)
        last = self._last
        if norm_type == 2.0 and last is not None and last[0] is plan:
            parts = last[1]
        else:
            parts = self._norm_parts(plan, self._grad_tensors(plan), norm_type)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        flat = _flat(parts, dtype)
        if not self.sharded:
            return torch.linalg.vector_norm(flat[plan.in_torch_order], norm_type)
        if norm_type == 2.0:
            sq = flat.square()
            sq = sq * plan.weights if plan.weights is not None else sq
            return all_reduce_sum_(sq.sum()).sqrt()
        return all_reduce_max_(flat.max() if flat.numel() else flat.new_zeros(()))

    def weight_sq_norms(self) -> torch.Tensor:
        """Per-layer sums of squares of the parameters themselves."""
        plan = self._plan(self._all_dense)
        with torch.no_grad():
            tensors = [local_part(p.detach()) for p in self.params]
            return self._sum_squares(plan, self._norm_parts(plan, tensors, 2.0))

    def reduce_tensors(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer sums of squares of arbitrary tensors shaped like the (local) parameters."""
        plan = self._plan(self._all_dense)
        return self._sum_squares(plan, self._norm_parts(plan, tensors, 2.0))

    def grads(self, pattern: tuple[int, ...]) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        """Parameters with a gradient and their local gradient tensors."""
        plan = self._plan(pattern)
        params = [self.params[i] for i in plan.present]
        return params, [local_part(p.grad) for p in params]  # type: ignore[arg-type]

    def _grad_tensors(self, plan: _Plan) -> list[torch.Tensor]:
        params = self.params
        if self.sharded:
            return [local_part(params[i].grad) for i in plan.present]  # type: ignore[arg-type]
        return [params[i].grad for i in plan.present]  # type: ignore[misc]

    def _norm_parts(
        self, plan: _Plan, tensors: list[torch.Tensor], norm_type: float
    ) -> list[torch.Tensor]:
        """Per-tensor norms, one tensor per (device, dtype) group then the sparse ones, on the
        home device, in the precision they were computed in (concatenation order)."""
        parts = []
        for group in plan.groups:
            members = tensors if len(group) == len(tensors) else [tensors[j] for j in group]
            norms = torch.stack(self._foreach_norms(members, norm_type))
            if norms.device != self.device:
                norms = norms.to(self.device, non_blocking=True)
            parts.append(norms)
        if plan.sparse:
            sparse = torch.stack([_sparse_norm(tensors[j], norm_type) for j in plan.sparse])
            parts.append(sparse.to(self.device, non_blocking=True))
        return parts

    def _sum_squares(self, plan: _Plan, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer sums of squares from per-tensor L2 norms."""
        sq = torch.zeros(self.num_layers, device=self.device, dtype=torch.float32)
        if not parts:
            return sq
        values = _flat(parts, torch.float32).square()
        if plan.weights is not None:
            values = values * plan.weights
        sq.index_add_(0, plan.layer_index, values)
        if self.sharded:
            all_reduce_sum_(sq)
        return sq

    def _foreach_norms(
        self, tensors: list[torch.Tensor], norm_type: float
    ) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
        dtype = accumulation_dtype(tensors[0].dtype)
        if self._foreach_ok:
            try:
                return torch._foreach_norm(tensors, norm_type, dtype=dtype)
            except (RuntimeError, TypeError, NotImplementedError):
                self._foreach_ok = False  # e.g. a backend without foreach kernels
        return [torch.linalg.vector_norm(t, norm_type, dtype=dtype) for t in tensors]

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
        concat_index = {pos: i for i, pos in enumerate(order)}
        in_present_order = [concat_index[pos] for pos in range(len(present))]
        # clip_grad_norm_ groups the gradients by (device, dtype) in the order of the parameters
        # given (first seen first) and sums group by group
        by_rank = sorted(range(len(present)), key=lambda pos: self._rank[present[pos]])
        torch_groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for pos in by_rank:
            grad = self.params[present[pos]]
            torch_groups.setdefault((grad.device, grad.dtype), []).append(concat_index[pos])
        in_torch_order = [i for members in torch_groups.values() for i in members]
        return _Plan(
            present,
            groups,
            sparse,
            layer_index,
            weights,
            has_grad,
            torch.tensor(in_present_order, dtype=torch.long, device=self.device),
            torch.tensor(in_torch_order, dtype=torch.long, device=self.device),
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """Low-precision tensors accumulate in float32; float32/float64 keep their own precision, as
    complex tensors do (the norm of a complex tensor is real: that of the magnitudes)."""
    if dtype in (torch.float32, torch.float64) or dtype.is_complex:
        return None
    return torch.float32


def _sparse_norm(tensor: torch.Tensor, norm_type: float) -> torch.Tensor:
    values = tensor.coalesce().values()
    return torch.linalg.vector_norm(values, norm_type, dtype=accumulation_dtype(values.dtype))


def _flat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The per-tensor norms of every group as one vector of ``dtype``."""
    if len(parts) == 1:
        return parts[0].to(dtype)
    return torch.cat([part.to(dtype) for part in parts])


def group_by_device_dtype(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), as foreach kernels need them."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    return list(groups.values())
