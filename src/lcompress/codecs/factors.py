"""Low-rank factors: W = A B with A (m×r) and B (r×n) at their dtype; or a rank selection's dense choice.

Θ = ``{"A", "B"}``, or ``{"dense": (m, n)}`` (the matrix view kept as it is, at the weights' dtype). Record
``{"kind": "factors", "A": piece, "B": piece}`` or ``{"kind": "factors", "dense": piece}``, each piece
``{"dtype", "shape", "seg"}``. The compact form is a low-rank pair of layers; a dense choice stays a plain layer.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor

from .base import Checker, Codec, CorruptFileError, Reader, Writer, dtype_name

__all__ = ["FactorsCodec"]


def _keys(theta_or_rec) -> tuple[str, ...]:
    return ("dense",) if "dense" in theta_or_rec else ("A", "B")


class FactorsCodec(Codec):
    """Two factors, or one dense matrix (see the module docstring)."""

    name = "factors"

    def stored_values(self, comp) -> int:
        return sum(t.numel() for t in comp.theta.values())

    def encode(self, comp, w: Writer) -> dict[str, Any]:
        th = comp.theta
        rec: dict[str, Any] = {"kind": "factors"}
        for key in _keys(th):
            t = th[key].detach()
            rec[key] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "seg": w.write_tensor(key, t)}
        return rec

    def check(self, rec, cfg, view, chk: Checker, f: str, depth: int) -> None:
        if len(view) != 2:
            raise chk.fail(f"{f}.kind", rec["kind"], f"is a matrix record for a view {view} that is not a matrix")
        shapes = {}
        for key in _keys(rec):
            r, fk = chk.get(rec, key, f), f"{f}.{key}"
            dt = chk.dtype(chk.get(r, "dtype", fk), f"{fk}.dtype")
            shapes[key] = s = chk.shape(chk.get(r, "shape", fk), f"{fk}.shape")
            if len(s) != 2:
                raise chk.fail(f"{fk}.shape", s, "is not a matrix shape")
            chk.tensor(chk.get(r, "seg", fk), dt, math.prod(s), f"{fk}.seg")
        if "dense" in shapes:
            if shapes["dense"] != view:
                raise chk.fail(f"{f}.dense.shape", shapes["dense"], f"is not the view {view}")
        elif shapes["A"][1] != shapes["B"][0] or [shapes["A"][0], shapes["B"][1]] != view:
            raise chk.fail(f"{f}.A/B.shape", [shapes["A"], shapes["B"]], f"do not multiply to the view {view}")

    def decode(self, rec, rd: Reader, cfg, where: str) -> dict[str, Any]:
        from .base import DTYPES

        out = {}
        for key in _keys(rec):
            r = rec[key]
            dt = DTYPES.get(r["dtype"])
            if dt is None:
                raise CorruptFileError(f"corrupted .lcz header: {where} has unknown dtype {r['dtype']!r}")
            out[key] = rd.read_tensor(r["seg"], dt, r["shape"], where)
        if "dense" in out:
            if out["dense"].dim() != 2:
                raise CorruptFileError(f"corrupted .lcz header: {where} has a dense matrix of shape {out['dense'].shape}")
        elif out["A"].dim() != 2 or out["B"].dim() != 2 or out["A"].shape[1] != out["B"].shape[0]:
            raise CorruptFileError(f"corrupted .lcz header: {where} has factors {out['A'].shape} and {out['B'].shape}")
        return out

    def delta(self, theta, view: Sequence[int], rec=None) -> Tensor:
        if "dense" in theta:  # a rank selection that kept the matrix dense
            if tuple(theta["dense"].shape) != tuple(view):
                raise CorruptFileError(
                    f"corrupted .lcz header: a dense matrix {tuple(theta['dense'].shape)} for a view {tuple(view)}")
            return theta["dense"]  # at its own dtype: a float64 matrix stays exact
        a, b = theta["A"], theta["B"]
        if (a.shape[0], b.shape[1]) != tuple(view):
            raise CorruptFileError(
                f"corrupted .lcz header: factors {tuple(a.shape)} @ {tuple(b.shape)} for a view {tuple(view)}")
        return (a @ b).reshape(tuple(view))

    def compact_specs(self, theta, rec, names, shapes, conv_scheme) -> dict[str, dict[str, Any]]:
        """A low-rank pair for a single matrix or conv weight; a dense choice stays a plain layer."""
        if "dense" in theta or len(names) != 1:
            return {}
        return {names[0]: {"kind": "lowrank", "A": theta["A"], "B": theta["B"], "conv_scheme": conv_scheme}}
