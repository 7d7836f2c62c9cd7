"""Learning rates per layer: what the optimizer will apply to each watched layer, read per step.

Detectors judge an update by what the optimizer really does with a gradient, so they need each
layer's learning rate and the optimizer's update rule. :class:`LearningRates` maps the optimizer's
param groups onto the watched layers once, then re-reads the groups' ``lr`` at every step without
a host sync: float learning rates are host values (compared with the previous step's; the ``[L]``
tensor is rebuilt only when one changed), tensor learning rates (capturable/fused optimizers) are
gathered on the device, again only when one of them was replaced or modified in place.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from gradwatch.engine.layers import Layout

UpdateRule = Literal["adaptive", "sgd"]

_ADAPTIVE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.SparseAdam,
)
_ADAPTIVE_NAMES = ("adam", "lion", "rmsprop", "adagrad")


def update_rule(optimizer: Any) -> UpdateRule | None:
    """How ``optimizer`` turns a gradient into an update, as far as detectors care.

    ``"adaptive"``: the Adam family (and sign/RMS-normalised rules such as Lion, RMSprop), whose
    per-element step is about the learning rate whatever the gradient's size; ``"sgd"``: the step
    is the learning rate times the gradient; None: another rule (L-BFGS, LAMB...), not judged.
    """
    if isinstance(optimizer, _ADAPTIVE):
        return "adaptive"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    name = type(optimizer).__name__.lower()
    if any(part in name for part in _ADAPTIVE_NAMES) and "lamb" not in name:
        return "adaptive"
    return None


class LearningRates:
    """Each watched layer's learning rate, re-read at every step without a host sync.

    A layer's learning rate is the RMS over its elements of their group's ``lr`` (a layer split over
    groups with different rates gets the rate its update has on average); elements the optimizer
    does not update count as 0, so a layer outside the optimizer has learning rate 0.

    Args:
        optimizer: The optimizer (its ``param_groups`` are read at every :meth:`read`).
        layout: The watched layers.

    Attributes:
        rule: The optimizer's update rule (:func:`update_rule`).
    """

    def __init__(self, optimizer: Any, layout: Layout) -> None:
        self.optimizer = optimizer
        self.rule = update_rule(optimizer)
        self._layout = layout
        self._key: tuple[Any, ...] | None = None
        self._lr = torch.zeros(layout.num_layers, device=layout.device)
        self._shares = self._group_shares()

    def _group_shares(self) -> torch.Tensor:
        """``[L, G]``: the fraction of each layer's elements in each param group."""
        groups = self.optimizer.param_groups
        group_of = {id(p): g for g, group in enumerate(groups) for p in group["params"]}
        shares = torch.zeros(self._layout.num_layers, max(1, len(groups)))
        for index, layer in enumerate(self._layout.layers):
            total = max(1, layer.numel)
            for param in layer.params:
                group = group_of.get(id(param))
                if group is not None:
                    shares[index, group] += param.numel() / total
        return shares.to(self._layout.device)

    def read(self) -> torch.Tensor:
        """``[L]`` learning rate of every layer for the coming update (device tensor)."""
        groups = self.optimizer.param_groups
        if len(groups) != self._shares.shape[1]:  # groups added (add_param_group): map again
            self._shares = self._group_shares()
            self._key = None
        rates = [group.get("lr", 0.0) for group in groups]
        key = tuple((id(r), r._version) if isinstance(r, torch.Tensor) else float(r) for r in rates)
        if key != self._key:
            device = self._layout.device
            values = torch.stack(
                [torch.as_tensor(r, dtype=torch.float32).to(device).reshape(()) for r in rates]
            )
            self._lr = (self._shares @ values.square()).sqrt()
            self._key = key
        return self._lr
