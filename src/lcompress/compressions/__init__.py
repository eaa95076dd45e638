"""Compression families; each class holds its hyperparameters and its last Θ, and registers itself in
:data:`REGISTRY` when it is defined (see :class:`Compression`)."""
from .additive import AdditiveCombination
from .base import REGISTRY, Compression, NotCompressedError, from_config
from .grouped import GroupedIntQuantization, NMPruning
from .lowrank import LowRank, RankSelection
from .pruning import ConstraintL0Pruning, ConstraintL1Pruning, PenaltyL0Pruning, PenaltyL1Pruning
from .quantization import (
    AdaptiveQuantization,
    BinaryQuantization,
    FixedAssignmentQuantization,
    PowersOfTwoQuantization,
    ScaledBinaryQuantization,
    ScaledTernaryQuantization,
    TernaryQuantization,
)

__all__ = [
    "Compression",
    "NotCompressedError",
    "AdaptiveQuantization",
    "BinaryQuantization",
    "ScaledBinaryQuantization",
    "TernaryQuantization",
    "ScaledTernaryQuantization",
    "PowersOfTwoQuantization",
    "FixedAssignmentQuantization",
    "ConstraintL0Pruning",
    "ConstraintL1Pruning",
    "PenaltyL0Pruning",
    "PenaltyL1Pruning",
    "GroupedIntQuantization",
    "NMPruning",
    "LowRank",
    "RankSelection",
    "AdditiveCombination",
    "REGISTRY",
    "from_config",
]
