"""lcompress: neural network compression by the Learning-Compression (LC) algorithm.

>>> import lcompress as lc
>>> alg = lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(k=2)})   # doctest: +SKIP
"""
from .algorithm import LC, clip_lr, clip_lr_adaptive
from .compressions import (
    AdaptiveQuantization,
    AdditiveCombination,
    BinaryQuantization,
    Compression,
    ConstraintL0Pruning,
    ConstraintL1Pruning,
    FixedAssignmentQuantization,
    GroupedIntQuantization,
    LowRank,
    NMPruning,
    NotCompressedError,
    PenaltyL0Pruning,
    PenaltyL1Pruning,
    PowersOfTwoQuantization,
    RankSelection,
    ScaledBinaryQuantization,
    ScaledTernaryQuantization,
    TernaryQuantization,
)
from .compressions.rowwise import RowwiseQuantization
from .export import CorruptFileError, ModelMismatchError
from .schedules import auto_schedule, geometric, measure_direct_compression


def load(path, model, compact: bool = False, strict: bool = True):
    """Load a compact ``.lcz`` file into a model skeleton (see :func:`lcompress.export.load`)."""
    from .export import load as _load

    return _load(path, model, compact=compact, strict=strict)


__version__ = "0.1.0"

__all__ = [
    "LC",
    "clip_lr",
    "clip_lr_adaptive",
    "geometric",
    "auto_schedule",
    "measure_direct_compression",
    "load",
    "CorruptFileError",
    "ModelMismatchError",
    "Compression",
    "NotCompressedError",
    "AdaptiveQuantization",
    "BinaryQuantization",
    "ScaledBinaryQuantization",
    "TernaryQuantization",
    "ScaledTernaryQuantization",
    "PowersOfTwoQuantization",
    "FixedAssignmentQuantization",
    "RowwiseQuantization",
    "GroupedIntQuantization",
    "NMPruning",
    "ConstraintL0Pruning",
    "ConstraintL1Pruning",
    "PenaltyL0Pruning",
    "PenaltyL1Pruning",
    "LowRank",
    "RankSelection",
    "AdditiveCombination",
]
