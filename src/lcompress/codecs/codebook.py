"""Codebook + codes: every weight one of K values; codes bit-packed at ⌈log₂ K⌉ bits, and the codebook's stored part.

Θ = ``{"codebook": (K,) float32, "codes": (n,) integers}``. Record ``{"kind": "codebook", "k", "n", "width",
"store", "codes"?, ...}`` where ``store`` says what the file keeps of the codebook:

* ``"all"``: the K float32 entries (``"entries"``, ``"codebook"``), a learned codebook;
* ``"scale"``: only a of {−a, a} or {−a, 0, a} (``"scale"``), a scaled fixed codebook;
* ``"none"``: nothing, a fixed codebook rebuilt from the task's compression config (a registered class whose codec
  stores ``"none"`` and which gives ``fixed_codebook()``); nothing is ever imported for it.

A one-entry codebook (K = 1) stores no codes. The compact form is a codebook layer per parameter (a joint task's
layers share one codebook tensor).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..sizes import index_bits
from .base import Checker, Codec, CorruptFileError, Reader, Writer

__all__ = ["CodebookCodec"]

STORES = ("all", "scale", "none")


def _scaled(a: Tensor, k: int) -> Tensor:
    a = a.reshape(())
    return torch.stack([-a, a]) if k == 2 else torch.stack([-a, a.new_zeros(()), a])


def _fixed_compression(cfg: Mapping[str, Any]):
    """The registered compression a config names when its codec stores no codebook, else None."""
    from ..compressions import REGISTRY, from_config

    cls = REGISTRY.get(cfg.get("type")) if isinstance(cfg, dict) else None
    codec = getattr(cls, "codec", None)
    if not (isinstance(cls, type) and isinstance(codec, CodebookCodec) and codec.store == "none"):
        return None
    return from_config(dict(cfg))


class CodebookCodec(Codec):
    """Codes and a codebook (see the module docstring).

    Args:
        store: what a file keeps of the codebook when this codec writes: ``"all"``, ``"scale"`` or ``"none"``.
    """

    name = "codebook"

    def __init__(self, store: str = "all") -> None:
        if store not in STORES:
            raise ValueError(f"store={store!r} must be one of {STORES}")
        self.store = store

    def __repr__(self) -> str:
        return f"CodebookCodec(store={self.store!r})"

    def stored_values(self, comp) -> int:
        return comp.theta["codes"].numel() + {"all": comp.k, "scale": 1, "none": 0}[self.store]

    def encode(self, comp, w: Writer) -> dict[str, Any]:
        th = comp.theta
        k, codes = comp.k, th["codes"].reshape(-1)
        cb = th["codebook"].detach().float().cpu().reshape(-1)
        width = index_bits(k)
        rec: dict[str, Any] = {"kind": "codebook", "k": k, "n": codes.numel(), "width": width, "store": self.store}
        if width:
            rec["codes"] = w.write_symbols("codes", codes, k)
        if self.store == "all":
            rec["entries"] = cb.numel()
            rec["codebook"] = w.write_tensor("codebook", cb)
        elif self.store == "scale":
            if k not in (2, 3) or not torch.equal(_scaled(cb[-1], k), cb):
                raise ValueError(f"codebook {cb.tolist()} is not of the scaled form {{-a, (0,) a}}")
            rec["scale"] = w.write_tensor("scale", cb[-1:])
        elif not torch.equal(comp.fixed_codebook().float().cpu(), cb):
            raise ValueError(f"codebook {cb.tolist()} is not the fixed one of {comp!r}")
        return rec

    def check(self, rec, cfg, view, chk: Checker, f: str, depth: int) -> None:
        n = math.prod(view)
        if chk.int_(chk.get(rec, "n", f), f"{f}.n") != n:
            raise chk.fail(f"{f}.n", rec["n"], f"is not the {n} weights of the view")
        k = chk.int_(chk.get(rec, "k", f), f"{f}.k", lo=1, hi=1 << 32)
        width = chk.get(rec, "width", f)
        if width != index_bits(k):
            raise chk.fail(f"{f}.width", width, f"is not ⌈log₂ K⌉ = {index_bits(k)} for K={k}")
        if width:
            chk.symbols(chk.get(rec, "codes", f), n, k, f"{f}.codes")
        store = chk.get(rec, "store", f)
        if store == "all":
            entries = chk.int_(chk.get(rec, "entries", f), f"{f}.entries", lo=1)
            chk.tensor(chk.get(rec, "codebook", f), torch.float32, entries, f"{f}.codebook")
        elif store == "scale":
            if k not in (2, 3):
                raise chk.fail(f"{f}.k", k, "is not 2 or 3 (a scaled codebook {-a, (0,) a})")
            chk.tensor(chk.get(rec, "scale", f), torch.float32, 1, f"{f}.scale")
        elif store == "none":
            try:
                comp = _fixed_compression(cfg)
            except (ValueError, TypeError):
                raise chk.fail(f"{f} config", cfg, "does not build a compression") from None
            if comp is None:
                raise chk.fail(f"{f} config", cfg, "is not a fixed-codebook compression")
            if comp.k != k:
                raise chk.fail(f"{f}.k", k, f"is not the {comp.k} entries of {cfg['type']}")
        else:
            raise chk.fail(f"{f}.store", store, "is not 'all', 'scale' or 'none'")

    def decode(self, rec, rd: Reader, cfg, where: str) -> dict[str, Any]:
        n, k, width = int(rec["n"]), int(rec["k"]), int(rec["width"])
        if width != index_bits(k):
            raise CorruptFileError(f"corrupted .lcz header: {where} codes of {width} bits for K={k}")
        codes = torch.from_numpy(rd.read_symbols(rec["codes"], n, k, where) if width else np.zeros(n, np.uint8))
        if rec["store"] == "all":
            cb = rd.read_tensor(rec["codebook"], torch.float32, [int(rec["entries"])], where)
        elif rec["store"] == "scale":
            cb = _scaled(rd.read_tensor(rec["scale"], torch.float32, [1], where), k)
        elif rec["store"] == "none":
            comp = _fixed_compression(cfg)
            if comp is None:
                raise CorruptFileError(f"corrupted .lcz header: {where} config is not a fixed-codebook compression")
            cb = comp.fixed_codebook().float().cpu()
        else:
            raise CorruptFileError(f"corrupted .lcz header: {where} has codebook store {rec['store']!r}")
        check_codes(codes, cb.numel(), where)
        return {"codebook": cb, "codes": codes if k <= 256 else codes.long()}

    def delta(self, theta, view: Sequence[int], rec=None) -> Tensor:
        n = math.prod(view)
        codes = theta["codes"]
        if codes.numel() != n:
            raise CorruptFileError(f"corrupted .lcz header: {codes.numel()} codes for a view of {n} weights")
        # int32 indices: half the memory of int64 ones, for a tensor as long as the view
        return theta["codebook"].index_select(0, codes.reshape(-1).to(torch.int32)).reshape(tuple(view))

    def compact_specs(self, theta, rec, names, shapes, conv_scheme) -> dict[str, dict[str, Any]]:
        """A codebook layer per parameter, all sharing the one codebook tensor."""
        numels = [math.prod(s) for s in shapes]
        codes = theta["codes"].reshape(-1)
        if codes.numel() != sum(numels):
            raise ValueError(f"Θ has {codes.numel()} codes for parameters {list(names)} with {sum(numels)} weights")
        out, o = {}, 0
        for n, s, k in zip(names, shapes, numels):
            out[n] = {"kind": "codebook", "codebook": theta["codebook"], "codes": codes[o : o + k].reshape(tuple(s))}
            o += k
        return out


def check_codes(codes: Tensor, entries: int, where: str) -> None:
    """Every code indexes the codebook (a checked header can still carry a payload whose codes do not)."""
    if codes.numel() and int(codes.max()) >= entries:
        raise CorruptFileError(f"corrupted .lcz payload: {where} has a code beyond its {entries}-entry codebook")
