"""Matrix views of weights: how a conv weight becomes the matrix a low-rank compression factorizes, and back.

A Linear weight (out, in) is its own view. A conv weight (out, in, kh, kw) is viewed as (out, in·kh·kw) under
``scheme_1`` or (out·kh, in·kw) under ``scheme_2`` (see :func:`to_matrix`).
"""
from __future__ import annotations

from torch import Tensor

__all__ = ["CONV_SCHEMES", "check_scheme", "matrix_shape", "to_matrix", "from_matrix"]

CONV_SCHEMES = ("scheme_1", "scheme_2")


def check_scheme(conv_scheme: str) -> str:
    """``conv_scheme`` itself, when it is one of :data:`CONV_SCHEMES`; else ValueError naming it."""
    if conv_scheme not in CONV_SCHEMES:
        raise ValueError(f"conv_scheme={conv_scheme!r} must be one of {CONV_SCHEMES}")
    return conv_scheme


def matrix_shape(shape: tuple[int, ...], conv_scheme: str = "scheme_1") -> tuple[int, int]:
    """Shape of the matrix view of a weight of ``shape`` (see :func:`to_matrix`)."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) >= 3:
        out, inp, *k = shape
        kk = 1
        for s in k:
            kk *= s
        if conv_scheme == "scheme_1" or len(k) != 2:
            return out, inp * kk
        return out * k[0], inp * k[1]
    raise ValueError(f"a low-rank compression needs a matrix or conv weight, got shape {tuple(shape)}")


def to_matrix(w: Tensor, conv_scheme: str = "scheme_1") -> Tensor:
    """Matrix view of a weight.

    Linear (out, in) stays as is. A conv weight (out, in, kh, kw) becomes (out, in·kh·kw) under scheme 1 (a k×k
    conv with r output channels followed by a 1×1 conv) or (out·kh, in·kw) under scheme 2 (a 1×kw conv with r
    output channels followed by a kh×1 conv).
    """
    if w.dim() == 2:
        return w
    if w.dim() == 4 and conv_scheme == "scheme_2":
        o, i, kh, kw = w.shape
        return w.permute(0, 2, 1, 3).reshape(o * kh, i * kw)
    if w.dim() >= 3:
        return w.reshape(w.shape[0], -1)
    raise ValueError(f"a low-rank compression needs a matrix or conv weight, got shape {tuple(w.shape)}")


def from_matrix(m: Tensor, shape: tuple[int, ...], conv_scheme: str = "scheme_1") -> Tensor:
    """Inverse of :func:`to_matrix`."""
    if len(shape) == 4 and conv_scheme == "scheme_2":
        o, i, kh, kw = shape
        return m.reshape(o, kh, i, kw).permute(0, 2, 1, 3).reshape(shape)
    return m.reshape(shape)
