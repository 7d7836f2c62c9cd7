"""Gradient histograms binned on the device, decoded on the host for ``add_histogram_raw``.

The bins are fixed and signed, log-spaced in ``|g|`` (the convention of TensorFlow's default
histogram buckets, coarser): a value ``g`` falls in bin ``sign(g) * m`` around a centre bin, where
``m = 0`` holds ``|g| < MIN_MAGNITUDE`` (zeros included) and ``m = 1..K`` are ``BINS_PER_DECADE``
bins per decade up to ``MAX_MAGNITUDE`` (larger values, infinities included, land in ``m = K``).
Because the edges never change, binning is a handful of element-wise kernels and one ``bincount``
per gradient tensor, with no host sync; the per-layer counts and statistics of one step form a
single ``[L, B + 5]`` tensor that joins the flush's one device-to-host transfer.

A tensor with more than ``MAX_BINNED`` values is binned on an evenly strided sample of about that
many values (an odd stride, so the sample walks across the columns of a weight matrix) and its
counts are scaled to the tensor's size; min, max, sum and sum of squares stay exact.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gradwatch.engine.layers import Layout

MIN_MAGNITUDE = 1e-12
MAX_MAGNITUDE = 1e6
BINS_PER_DECADE = 8
_MAGNITUDE_BINS = round(math.log10(MAX_MAGNITUDE / MIN_MAGNITUDE) * BINS_PER_DECADE)  # K
NUM_BINS = 2 * _MAGNITUDE_BINS + 1  # B: -K..K
_STATS = ("min", "max", "num", "sum", "sum_squares")
MAX_BINNED = 1 << 16


def bucket_limits() -> np.ndarray:
    """Right edges of the ``NUM_BINS`` signed bins, increasing (the last one is ``+inf``)."""
    k = _MAGNITUDE_BINS
    ratio = 10.0 ** (1.0 / BINS_PER_DECADE)
    magnitudes = MIN_MAGNITUDE * ratio ** np.arange(k + 1, dtype=np.float64)  # edge m: lo * r^m
    negative = -magnitudes[k - 1 :: -1]  # bins m = -K..-1: right edge -lo * r^(|m| - 1)
    positive = magnitudes[1:].copy()  # bins m = 1..K: right edge lo * r^m
    positive[-1] = np.inf
    return np.concatenate([negative, [MIN_MAGNITUDE], positive])


class GradientHistograms:
    """Per-layer gradient histograms with fixed signed log-spaced bins.

    :meth:`compute` runs on the training step (device only); :meth:`decode` runs at the flush on
    the host copy. Transient memory is one float32 copy of the largest gradient tensor.

    Args:
        layout: The watched layers (forward order, home device).
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.layer_names = layout.names
        self._layer_of = {
            id(param): index for index, layer in enumerate(layout.layers) for param in layer.params
        }
        self._limits = bucket_limits()
        self._per_octave = BINS_PER_DECADE * math.log10(2.0)  # bins per factor of 2
        self._offset = 1.0 - BINS_PER_DECADE * math.log10(MIN_MAGNITUDE)

    def compute(
        self, params: list[torch.nn.Parameter], grads: list[torch.Tensor], sq_norms: torch.Tensor
    ) -> torch.Tensor:
        """Bins this step's gradients per layer, on the device, without a host sync.

        Args:
            params: The parameters with a gradient.
            grads: Their (local) gradients.
            sq_norms: ``[L]`` per-layer sums of squares of the gradients.

        Returns:
            ``[L, NUM_BINS + 5]`` float32: bin counts, then min, max, count, sum, sum of squares.
        """
        num_layers = self.layout.num_layers
        device = self.layout.device
        counts = torch.zeros(num_layers, NUM_BINS + 1, device=device, dtype=torch.float32)
        mins = torch.full((num_layers,), math.inf, device=device)
        maxs = torch.full((num_layers,), -math.inf, device=device)
        sums = torch.zeros(num_layers, device=device)
        layer_minmax: list[torch.Tensor] = []
        layer_sums: list[torch.Tensor] = []
        layer_index: list[int] = []
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                if grad is None:  # dropped by a remedy (the step is skipped)
                    continue
                layer = self._layer_of[id(param)]
                values = _flat_float(grad)
                if values.numel() == 0:
                    continue
                sample, scale = _strided_sample(values)
                counts[layer] += self._bin_counts(sample).to(device, torch.float32) * scale
                layer_minmax.append(torch.stack(torch.aminmax(values)).to(device))
                layer_sums.append(values.sum().to(device))
                layer_index.append(layer)
            if layer_index:
                index = torch.tensor(layer_index, device=device)
                minmax = torch.stack(layer_minmax)
                mins.scatter_reduce_(0, index, minmax[:, 0], "amin")
                maxs.scatter_reduce_(0, index, minmax[:, 1], "amax")
                sums.index_add_(0, index, torch.stack(layer_sums))
            counts = counts[:, :NUM_BINS]  # the last column collected NaNs
            stats = torch.stack([mins, maxs, counts.sum(1), sums, sq_norms.float()], dim=1)
            return torch.cat([counts, stats], dim=1)

    def _bin_counts(self, values: torch.Tensor) -> torch.Tensor:
        """Counts of ``values`` per signed bin (``NUM_BINS + 1`` entries, NaNs in the last).

        ``m = clamp(floor((log10|g| - log10 lo) * BINS_PER_DECADE) + 1, 0, K)``, computed in place
        on one copy as ``floor(log2|g| * a + b)``, signed with ``copysign`` and shifted by ``K``.
        """
        k = float(_MAGNITUDE_BINS)
        magnitude = values.abs().log2_().mul_(self._per_octave).add_(self._offset).floor_()
        signed = magnitude.clamp_(0.0, k).copysign_(values).add_(k)
        signed.nan_to_num_(nan=float(NUM_BINS))
        return torch.bincount(signed.to(torch.int32), minlength=NUM_BINS + 1)

    def decode(self, host_array: np.ndarray) -> list[tuple[str, dict[str, Any]]]:
        """Turns one host copy of :meth:`compute` into ``add_histogram_raw`` keyword arguments.

        Empty bins at both ends are dropped and layers without a gradient are left out.

        Args:
            host_array: ``[L, NUM_BINS + 5]`` as returned by :meth:`compute`, on the host.

        Returns:
            ``(layer name, kwargs)`` per layer with values, in forward order; ``kwargs`` holds
            ``min``, ``max``, ``num``, ``sum``, ``sum_squares``, ``bucket_limits`` and
            ``bucket_counts``.
        """
        rows = np.asarray(host_array, dtype=np.float64).reshape(len(self.layer_names), -1)
        out: list[tuple[str, dict[str, Any]]] = []
        for name, row in zip(self.layer_names, rows, strict=True):
            counts = row[:NUM_BINS]
            low, high, num, total, squares = row[NUM_BINS:]
            occupied = np.flatnonzero(counts)
            if num <= 0 or not len(occupied):
                continue
            first, last = occupied[0], occupied[-1] + 1
            limits = self._limits[first:last].copy()
            if not np.isfinite(high):  # an infinity or a NaN: the edges of the occupied bins
                high = limits[-1] if np.isfinite(limits[-1]) else 10.0 * MAX_MAGNITUDE
            if not np.isfinite(low):
                low = min(-10.0 * MAX_MAGNITUDE, high) if first == 0 else self._limits[first - 1]
            if not np.isfinite(limits[-1]):
                limits[-1] = high
            out.append(
                (
                    name,
                    {
                        "min": float(low),
                        "max": float(high),
                        "num": int(num),
                        "sum": float(total) if np.isfinite(total) else 0.0,
                        "sum_squares": float(squares) if np.isfinite(squares) else 0.0,
                        "bucket_limits": limits.tolist(),
                        "bucket_counts": counts[first:last].tolist(),
                    },
                )
            )
        return out


def _flat_float(grad: torch.Tensor) -> torch.Tensor:
    """The gradient's values as a flat float32 tensor (sparse gradients: their stored values;
    complex ones: their magnitudes)."""
    values = grad.detach()
    if values.is_sparse:
        values = values.coalesce().values()
    if values.is_complex():
        values = values.abs()
    values = values.reshape(-1)
    return values if values.dtype == torch.float32 else values.float()


def _strided_sample(values: torch.Tensor) -> tuple[torch.Tensor, float]:
    """About ``MAX_BINNED`` evenly strided values of a flat tensor, and the count scale."""
    numel = values.numel()
    if numel <= MAX_BINNED:
        return values, 1.0
    stride = -(-numel // MAX_BINNED) | 1  # ceil, made odd
    sample = values[::stride]
    return sample, numel / sample.numel()
