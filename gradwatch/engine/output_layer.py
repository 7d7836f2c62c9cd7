"""The output layer: which layers produce the model output, found from its autograd graph.

"The last layer to run" is not the output layer in general: a ViT's root module owns
``cls_token``/``pos_embed`` and finishes last, ``nn.MultiheadAttention``'s ``out_proj`` never runs
its own forward, a language model's head may be tied to the embedding (it owns no parameter, so the
last layer to run is the final LayerNorm). The graph knows: starting from the model output (captured
by a forward hook on the root during the first training forward), the first operation on the way
back that consumes a parameter with at least two dimensions is the output projection; operations
that only move or cast data (transpose, view, expand, dtype casts...) are looked through, and so are
operations consuming only vectors or scalars (a bias, a temperature, a final gain). A tuple output
gives every head; in a dict output (Hugging Face style) ``logits`` wins over a loss. A tied head is
found as the tied tensor, so the embedding that owns it is the output layer.

When the graph is opaque (``torch.compile`` turns the model into one node consuming every
parameter) or was not captured, the fallback is the last Linear/Conv/Embedding layer to run.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gradwatch.engine.hooks import ForwardHook, Handles
from gradwatch.engine.layers import Layer
from gradwatch.engine.roles import Role, role_of

_TRANSPARENT = (
    "TBackward",
    "TransposeBackward",
    "PermuteBackward",
    "ViewBackward",
    "UnsafeViewBackward",
    "ReshapeAliasBackward",
    "ExpandBackward",
    "ToCopyBackward",
    "AliasBackward",
    "SqueezeBackward",
    "UnsqueezeBackward",
    "CloneBackward",
    "ContiguousBackward",
    "AsStridedBackward",
    "SliceBackward",
    "SelectBackward",
    "NumpyTBackward",
)
"""Autograd nodes that only move or cast data: a parameter behind them is consumed above."""
_MAX_NODES = 100_000


class OutputCapture:
    """Keeps the autograd roots of the model output of the first training forward.

    Args:
        model: The root module (hooked until :meth:`take` or :meth:`remove`).
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self._roots: list[Any] = []
        self._handles = Handles(self)
        self._handles.add(model.register_forward_hook(ForwardHook(self, OutputCapture._ran, 0)))

    def _ran(self, index: int, output: Any) -> None:
        model = self._model()
        if self._roots or model is None or not model.training or not torch.is_grad_enabled():
            return
        self._roots = [t.grad_fn for t in output_tensors(output) if t.grad_fn is not None]

    def take(self) -> list[Any]:
        """The captured roots (empty if no training forward ran); removes the hook."""
        roots, self._roots = self._roots, []
        self._handles.remove()
        return roots

    def remove(self) -> None:
        """Removes the hook and forgets the graph."""
        self._roots = []
        self._handles.remove()


def output_tensors(output: Any, prefer: tuple[str, ...] = ("logits",)) -> list[torch.Tensor]:
    """The tensors of a model output that carry a graph; a ``logits`` entry wins over a loss."""
    if isinstance(output, torch.Tensor):
        return [output] if output.grad_fn is not None else []
    if isinstance(output, Mapping) or callable(getattr(output, "keys", None)):
        keys = list(output.keys())
        for key in prefer:
            value = output[key] if key in keys else None
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                return [value]
        return [t for k in keys if not str(k).startswith("loss") for t in output_tensors(output[k])]
    if isinstance(output, tuple | list):
        return [t for value in output for t in output_tensors(value, prefer)]
    return []


def output_params(roots: Iterable[Any]) -> list[torch.Tensor]:
    """The parameters of the operation(s) producing the output, one breadth-first walk per root."""
    found: dict[int, torch.Tensor] = {}
    for root in roots:
        queue, seen = deque([root]), set[int]()
        while queue and len(seen) < _MAX_NODES:
            node = queue.popleft()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)
            if variable is not None:  # the output is a parameter itself
                found[id(variable)] = variable
                break
            children = [child for child, _ in node.next_functions]
            if not _is_transparent(node):
                params = _consumed_params(node)
                if any(p.dim() >= 2 for p in params):
                    found.update((id(p), p) for p in params)
                    break
            queue.extend(children)
    return list(found.values())


def output_layers(roots: list[Any], layers: list[Layer]) -> list[int]:
    """Indices of the output layers among ``layers`` (in forward order).

    The graph rule first; the last Linear/Conv/Embedding layer to run when the graph was not
    captured or is opaque (one node consuming the parameters of most layers); the last layer when
    there is none.
    """
    layer_of = {id(p): index for index, layer in enumerate(layers) for p in layer.params}
    found = sorted({layer_of[id(p)] for p in output_params(roots) if id(p) in layer_of})
    if found and not (len(found) > 2 and len(found) > len(layers) // 2):
        return found
    weighted = [
        index
        for index, layer in enumerate(layers)
        if role_of(layer.module) in (Role.WEIGHT, Role.EMBEDDING)
    ]
    if weighted:
        return weighted[-1:]
    return [len(layers) - 1] if layers else []


def _is_transparent(node: Any) -> bool:
    name = type(node).__name__
    return name.startswith(_TRANSPARENT)


def _consumed_params(node: Any) -> list[torch.Tensor]:
    """Parameters ``node`` consumes directly or through transparent nodes."""
    found: list[torch.Tensor] = []
    stack = [child for child, _ in node.next_functions if child is not None]
    seen: set[int] = set()
    while stack:
        child = stack.pop()
        if id(child) in seen:
            continue
        seen.add(id(child))
        variable = getattr(child, "variable", None)  # AccumulateGrad
        if variable is not None:
            found.append(variable)
        elif _is_transparent(child):
            stack.extend(c for c, _ in child.next_functions if c is not None)
    return found
