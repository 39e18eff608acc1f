"""Pair sources, one module each, behind one interface (pairs.base.PairSource)."""

from __future__ import annotations


def source_for(method: str):
    """The pair source a method trains on."""
    if method in ("qdpo", "auto"):  # auto: QDPO pairs, whose chosen answers also serve distillation
        from qdpo_core.pairs.qdpo import QdpoPairs

        return QdpoPairs()
    if method == "dpo":
        from qdpo_core.pairs.user import UserPairs

        return UserPairs()
    if method == "kd":
        from qdpo_core.pairs.distill import DistillationTargets

        return DistillationTargets()
    if method == "rlaif":
        from qdpo_core.pairs.rlaif import RLAIFPairs

        return RLAIFPairs()
    if method == "factuality":
        from qdpo_core.pairs.factuality import FactualityPairs

        return FactualityPairs()
    raise ValueError(f"no pair source for method {method!r}")
