"""Model surgery: changing a model's modules in place (finding every place a module sits, removing dead units).

:func:`remove_dead_neurons` shrinks a chain of Linear layers by removing hidden units that a pruned model can no
longer use. (The compact inference modules that replace compressed layers are in :mod:`lcompress.nn`.)
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["remove_dead_neurons"]

logger = logging.getLogger(__name__)


def _module_slots(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """{module name: every (parent, attribute) that holds that module} (a module reused twice is listed once,
    under its first name, with both slots)."""
    by_id: dict[int, str] = {}
    seen: set[tuple[int, str]] = set()
    slots: dict[str, list[tuple[nn.Module, str]]] = {}
    for pname, parent in model.named_modules(remove_duplicate=False):
        for cname, child in parent._modules.items():  # named_children() would skip a repeated child
            if child is None or (id(parent), cname) in seen:
                continue
            seen.add((id(parent), cname))
            full = f"{pname}.{cname}" if pname else cname
            first = by_id.setdefault(id(child), full)
            slots.setdefault(first, []).append((parent, cname))
    return slots



@torch.no_grad()
def remove_dead_neurons(
    model: nn.Module,
    chain: Sequence[str],
    activation: Callable[[Tensor], Tensor] = F.relu,
) -> dict[str, Any]:
    """Remove hidden units of a chain of Linear layers that cannot affect the output; shrink the layers in place.

    The chain is layers L₀ → f → L₁ → f → … → L_last, with an elementwise activation f between consecutive
    layers. A unit j of layer i < last is removed when

    * it is **dead**: row j of Wᵢ is zero, so its output is the constant f(bᵢⱼ); that constant times column j
      of Wᵢ₊₁ is folded into bᵢ₊₁ (a bias is created if the next layer had none), or
    * it is **unused**: column j of Wᵢ₊₁ is zero.

    Removing units can zero more rows and columns, so the rules are applied until nothing changes. The chain's
    inputs and the last layer's outputs are kept (the model's interface does not change); the number of inputs
    still used (nonzero columns of W₀) is reported.

    Args:
        model: the model holding the layers (modified in place: shrunk ``nn.Linear`` modules replace the old ones).
        chain: names of the ``nn.Linear`` modules, in order.
        activation: the elementwise f between the layers (default ReLU); used only to fold dead units' f(b).

    Returns:
        ``{"inputs_used": int, "sizes_before": [...], "sizes_after": [...], "removed": {layer: units}}`` where the
        sizes are (inputs, units of each layer).

    Raises:
        ValueError: fewer than two layers, an unknown name, or consecutive layers whose sizes do not chain.
        TypeError: a named module is not an ``nn.Linear``.
    """
    chain = list(chain)
    if len(chain) < 2:
        raise ValueError(f"chain={chain!r} must name at least two Linear layers")
    modules = dict(model.named_modules())
    layers = []
    for n in chain:
        if n not in modules:
            raise ValueError(f"chain: no module named {n!r}")
        if type(modules[n]) is not nn.Linear:
            raise TypeError(f"chain: {n!r} is a {type(modules[n]).__name__}, not an nn.Linear")
        layers.append(modules[n])
    for (n0, l0), (n1, l1) in zip(zip(chain, layers), zip(chain[1:], layers[1:])):
        if l0.out_features != l1.in_features:
            raise ValueError(f"chain: {n0!r} has {l0.out_features} outputs but {n1!r} takes {l1.in_features} inputs")
    ws = [l.weight.detach().clone() for l in layers]
    bs = [None if l.bias is None else l.bias.detach().clone() for l in layers]
    sizes_before = [ws[0].shape[1]] + [w.shape[0] for w in ws]
    removed = {n: 0 for n in chain[:-1]}
    changed = True
    while changed:
        changed = False
        for i in range(len(ws) - 1):
            w, nxt = ws[i], ws[i + 1]
            dead = (w == 0).all(dim=1)
            unused = (nxt == 0).all(dim=0)
            drop = dead | unused
            if not bool(drop.any()):
                continue
            fold = dead & ~unused
            if bool(fold.any()):
                bias = bs[i][fold] if bs[i] is not None else torch.zeros(int(fold.sum()), dtype=w.dtype, device=w.device)
                const = activation(bias)
                if bool((const != 0).any()):
                    add = nxt[:, fold] @ const
                    bs[i + 1] = add if bs[i + 1] is None else bs[i + 1] + add
            keep = ~drop
            ws[i] = w[keep]
            if bs[i] is not None:
                bs[i] = bs[i][keep]
            ws[i + 1] = nxt[:, keep]
            removed[chain[i]] += int(drop.sum())
            changed = True
    slots = _module_slots(model)
    for name, old, w, b in zip(chain, layers, ws, bs):
        if w.shape == old.weight.shape and (b is None) == (old.bias is None):
            if b is not None:
                old.bias.copy_(b)
            continue
        with warnings.catch_warnings():  # a layer left with no units warns that its init is a no-op
            warnings.simplefilter("ignore", UserWarning)
            new = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None, device=w.device,
                                           dtype=w.dtype)
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
        new.train(old.training)
        for parent, cname in slots[name]:
            setattr(parent, cname, new)
    sizes_after = [ws[0].shape[1]] + [w.shape[0] for w in ws]
    inputs_used = int((ws[0] != 0).any(dim=0).sum())
    logger.info("remove_dead_neurons: %s -> %s (%d inputs used)", sizes_before, sizes_after, inputs_used)
    return {"inputs_used": inputs_used, "sizes_before": sizes_before, "sizes_after": sizes_after, "removed": removed}
