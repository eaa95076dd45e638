"""Compression families; each class holds its hyperparameters and its last Θ."""
from .additive import AdditiveCombination
from .base import Compression, NotCompressedError
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
    "LowRank",
    "RankSelection",
    "AdditiveCombination",
    "REGISTRY",
    "from_config",
]

REGISTRY = {
    cls.__name__: cls
    for cls in (
        AdaptiveQuantization,
        BinaryQuantization,
        ScaledBinaryQuantization,
        TernaryQuantization,
        ScaledTernaryQuantization,
        PowersOfTwoQuantization,
        ConstraintL0Pruning,
        ConstraintL1Pruning,
        PenaltyL0Pruning,
        PenaltyL1Pruning,
        LowRank,
        RankSelection,
    )
}


def from_config(config: dict) -> Compression:
    """Rebuild a compression from :meth:`Compression.config` output (not FixedAssignmentQuantization, whose
    assignments live in its state)."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"a compression config must be a dict with a 'type' key, got {config!r}")
    cfg = dict(config)
    name = cfg.pop("type")
    if name == "AdditiveCombination":
        parts = [from_config(p) for p in cfg.pop("parts")]
        return AdditiveCombination(*parts, **cfg)
    if name not in REGISTRY:
        raise ValueError(f"unknown compression {name!r}; known: {', '.join(sorted(REGISTRY))}, AdditiveCombination")
    try:
        return REGISTRY[name](**cfg)
    except TypeError as e:
        raise ValueError(f"bad arguments for {name}: {e}") from None
