"""Codecs: one per stored form of Θ, each registered under the record kind it writes (see :mod:`.base`).

Built in: ``codebook`` (:class:`CodebookCodec`), ``sparse`` (:class:`SparseCodec`), ``factors``
(:class:`FactorsCodec`) and ``sum`` (:class:`SumCodec`). A compression defined anywhere declares one of these (or a
codec of its own: subclass :class:`Codec` with a ``name``) as its class attribute ``codec``.
"""
from .base import (
    CODECS,
    Checker,
    Codec,
    CorruptFileError,
    Reader,
    Writer,
    check_theta,
    codec_for,
    decode_theta,
    delta_of,
)
from .bits import delta_decode, delta_encode, pack_bits, unpack_bits
from .codebook import CodebookCodec
from .factors import FactorsCodec
from .sparse import SparseCodec
from .sum import SumCodec

__all__ = [
    "CODECS", "Codec", "Checker", "CorruptFileError", "Reader", "Writer", "check_theta", "codec_for", "decode_theta",
    "delta_of", "pack_bits", "unpack_bits", "delta_encode", "delta_decode", "CodebookCodec", "FactorsCodec",
    "SparseCodec", "SumCodec",
]
