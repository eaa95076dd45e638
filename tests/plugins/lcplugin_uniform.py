"""A compression defined outside the lcompress package, with a codec of its own: what a newcomer writes to add one.

``UniformQuantization(bits)``: every weight one of 2ᵇ evenly spaced values lo + step·c, c ∈ [0, 2ᵇ). Θ is
``{"lo": (1,), "step": (1,), "codes": (n,), "bits": b}`` and the file stores the codes at b bits each plus two float32 values
(record kind ``"uniform"``); it loads compactly as a codebook layer (codebook lo + step·arange(2ᵇ)).

The C step is a local method, not the exact minimiser over (lo, step): the grid spans the weights' range, then
alternates nearest codes with the least-squares (lo, step) for those codes, keeping the best.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lcompress.codecs import Codec
from lcompress.compressions import Compression
from lcompress.compressions.base import check_int


def _values(lo: Tensor, step: Tensor, codes: Tensor) -> Tensor:
    """lo + step·c in float32 (the one formula the C step, the decoder and the compact codebook share)."""
    return lo + step * codes.float()


class UniformCodec(Codec):
    name = "uniform"

    def stored_values(self, comp) -> int:
        return comp.theta["codes"].numel() + 2

    def encode(self, comp, w) -> dict[str, Any]:
        th = comp.theta
        return {"kind": self.name, "n": th["codes"].numel(), "bits": comp.bits,
                "codes": w.write_symbols("codes", th["codes"], 1 << comp.bits),
                "lo": w.write_tensor("lo", th["lo"].float()), "step": w.write_tensor("step", th["step"].float())}

    def check(self, rec, cfg, view, chk, f, depth) -> None:
        n = math.prod(view)
        if chk.int_(chk.get(rec, "n", f), f"{f}.n") != n:
            raise chk.fail(f"{f}.n", rec["n"], f"is not the {n} weights of the view")
        bits = chk.int_(chk.get(rec, "bits", f), f"{f}.bits", lo=1, hi=8)
        chk.symbols(chk.get(rec, "codes", f), n, 1 << bits, f"{f}.codes")
        for key in ("lo", "step"):
            chk.tensor(chk.get(rec, key, f), torch.float32, 1, f"{f}.{key}")

    def decode(self, rec, rd, cfg, where) -> dict[str, Any]:
        codes = torch.from_numpy(rd.read_symbols(rec["codes"], rec["n"], 1 << rec["bits"], where).astype(np.uint8))
        return {"lo": rd.read_tensor(rec["lo"], torch.float32, [1], where),
                "step": rd.read_tensor(rec["step"], torch.float32, [1], where), "codes": codes, "bits": rec["bits"]}

    def delta(self, theta, view, rec=None) -> Tensor:
        return _values(theta["lo"], theta["step"], theta["codes"].reshape(tuple(view)))

    def compact_specs(self, theta, rec, names, shapes, conv_scheme) -> dict[str, dict[str, Any]]:
        cb = _values(theta["lo"], theta["step"], torch.arange(1 << theta["bits"]))
        codes, out, o = theta["codes"].reshape(-1), {}, 0
        for name, s in zip(names, shapes):
            m = math.prod(s)
            out[name] = {"kind": "codebook", "codebook": cb, "codes": codes[o : o + m].reshape(tuple(s))}
            o += m
        return out


class UniformQuantization(Compression):
    """Uniform quantization to 2ᵇ levels lo + step·c (see the module docstring).

    Args:
        bits: b, 1 ≤ b ≤ 8.
    """

    codec = UniformCodec()
    idempotence = "approximate"  # Δ(Θ) comes back up to float rounding of (lo, step)

    @classmethod
    def examples(cls) -> list["UniformQuantization"]:
        return [cls(bits=2), cls(bits=3)]

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = check_int("bits", bits, low=1, high=8)

    def _config(self) -> dict[str, Any]:
        return {"bits": self.bits}

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        x = w.reshape(-1)
        k = 1 << self.bits
        lo, hi = x.min(), x.max()
        step = (hi - lo) / (k - 1)
        best = None
        for _ in range(8):
            codes = (torch.round((x - lo) / step) if float(step) > 0 else torch.zeros_like(x)).clamp(0, k - 1)
            d = float(((x - _values(lo, step, codes)) ** 2).sum())
            if best is not None and d >= best[0]:
                break
            best = (d, lo.clone(), step.clone(), codes)
            c = codes - codes.mean()  # least-squares (lo, step) for these codes
            var = float((c * c).sum())
            if var == 0:
                break
            step = (c * (x - x.mean())).sum() / var
            lo = x.mean() - step * codes.mean()
            if not float(step) > 0:
                break
        _, lo, step, codes = best
        self._theta = {"lo": lo.reshape(1).float(), "step": step.reshape(1).float(), "codes": codes.to(torch.uint8),
                       "bits": self.bits}
        return self._decompress_shape(w.shape)

    def _decompress_shape(self, shape) -> Tensor:
        th = self._theta
        return _values(th["lo"], th["step"], th["codes"]).reshape(shape)

    def _decompress(self) -> Tensor:
        return self._decompress_shape(self._shape)
