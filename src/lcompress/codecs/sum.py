"""Sums of compressions: Θ = ``{"part0": Θ₀, "part1": Θ₁, …}``, Δ = Σᵢ Δᵢ(Θᵢ).

Record ``{"kind": "sum", "parts": [record, ...]}``, each part written by its own compression's codec; the task's
config is an ``AdditiveCombination`` config whose parts match the records one to one. Nesting is refused beyond
:data:`lcompress.codecs.base.MAX_SUM_DEPTH` levels. Loaded compactly, a sum over one Linear weight whose every part
has a compact form becomes a :class:`lcompress.nn.SumLinear` of the parts' layers; any other sum stays a dense layer
(Δ(Θ) as its weight).
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from .base import MAX_SUM_DEPTH, Checker, Codec, Reader, Writer, codec_for, decode_theta, delta_of

__all__ = ["SumCodec"]


class SumCodec(Codec):
    """Each part by its own codec (see the module docstring)."""

    name = "sum"

    def stored_values(self, comp) -> int:
        return sum(codec_for(p).stored_values(p) for p in comp.parts)

    def encode(self, comp, w: Writer) -> dict[str, Any]:
        return {"kind": "sum", "parts": [codec_for(p).encode(p, w) for p in comp.parts]}

    def check(self, rec, cfg, view, chk: Checker, f: str, depth: int) -> None:
        if depth >= MAX_SUM_DEPTH:
            raise chk.fail(f"{f}.kind", "sum", f"nests sums deeper than {MAX_SUM_DEPTH} levels")
        parts = chk.list_(chk.get(rec, "parts", f), f"{f}.parts")
        cparts = chk.get(cfg, "parts", f"{f} config") if isinstance(cfg, dict) else None
        if not (isinstance(cfg, dict) and cfg.get("type") == "AdditiveCombination" and isinstance(cparts, list)):
            raise chk.fail(f"{f} config", cfg, "is not an AdditiveCombination config for a sum record")
        if len(parts) < 2 or len(parts) != len(cparts):
            raise chk.fail(f"{f}.parts", f"{len(parts)} parts", f"for a config of {len(cparts)} parts")
        for i, (r, c) in enumerate(zip(parts, cparts)):
            chk.theta(r, c, view, f"{f}.parts[{i}]", depth + 1)

    def decode(self, rec, rd: Reader, cfg, where: str) -> dict[str, Any]:
        parts = cfg["parts"]
        return {f"part{i}": decode_theta(r, rd, parts[i], f"{where} part {i}") for i, r in enumerate(rec["parts"])}

    def compact_specs(self, theta, rec, names, shapes, conv_scheme) -> dict[str, dict[str, Any]]:
        """``{"kind": "sum", "parts": [spec, ...]}`` for a single weight whose every part has a compact spec (``rec``:
        the file's sum record, whose parts are records, or the ``AdditiveCombination`` config, whose parts are
        configs)."""
        parts = rec.get("parts") if isinstance(rec, dict) else None
        if len(names) != 1 or not isinstance(parts, list):
            return {}
        specs = []
        for i, r in enumerate(parts):
            spec = _part_codec(r).compact_specs(theta[f"part{i}"], r, names, shapes, conv_scheme).get(names[0])
            if spec is None:
                return {}
            specs.append(spec)
        return {names[0]: {"kind": "sum", "parts": specs}}

    def delta(self, theta, view: Sequence[int], rec) -> Tensor:
        out = None
        for i, r in enumerate(rec["parts"]):
            d = delta_of(r, theta[f"part{i}"], view)
            out = d if out is None else out + d
        return out


def _part_codec(rec: dict) -> Codec:
    """A part's codec: by its record's kind (a file) or its config's compression type (a live compression)."""
    if "kind" in rec:
        from .base import CODECS

        return CODECS[rec["kind"]]
    from ..compressions.base import REGISTRY

    return REGISTRY[rec["type"]].codec
