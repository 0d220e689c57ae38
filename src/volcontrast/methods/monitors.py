"""Collapse monitors: something a method returns (``PretrainMethod.monitors``) and the engine feeds every logged
row. A monitor counts consecutive logged rows that look collapsed and, after ``patience`` of them, flags the row
(``collapse_warning``) and says once what is wrong.

- :class:`ContrastiveCollapse` (InfoNCE methods): the loss sits at its all-embeddings-equal value *and* the
  embeddings have no spread (many-positive masks such as GCL's can sit near that value while learning).
- :class:`SelfDistillationCollapse` (Alice): the teacher sends every row to the same prototype (usage near
  1/K) or gives every row the uniform distribution (entropy near ln K).
- :class:`SignalBound` (VoCo, MAE): a logged signal stays past a bound — VoCo: the mean cosine between base
  crops (features that must differ) at or above 0.99; MAE: the spread of the reconstruction at or below 1% of
  the target's (the decoder paints a constant).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field


@dataclass
class Monitor(abc.ABC):
    """Base: counts consecutive collapsed rows; ``update`` returns (flag, message the first time it trips)."""

    count: int = field(default=0, init=False)

    @abc.abstractmethod
    def collapsed(self, row: dict[str, float]) -> str | None:
        """What is collapsed about this logged row (one sentence), or None."""

    def update(self, row: dict[str, float], judged: bool, patience: int) -> tuple[bool, str | None]:
        what = self.collapsed(row) if judged else None
        self.count = self.count + 1 if what is not None else 0
        return self.count >= patience, (what if self.count == patience else None)


@dataclass
class ContrastiveCollapse(Monitor):
    """InfoNCE collapse, judged on each logged row (its mean over the logging interval).

    A row is collapsed when the embeddings have no spread (``embedding_spread < 1e-3``), or when the loss stays
    within ``band`` (3%) of its all-embeddings-equal value *and* either the spread is small (< 0.05) or the
    positive and negative similarities have converged (``pos_cosine − neg_cosine < gap``), or when the
    similarities have converged high (``neg_cosine > 0.9`` and the gap below ``gap``) whatever the loss.
    A near-collapse such as PCL's on a brain cohort (loss 1.5% below the collapse value, cosines 0.97 / 0.94) is
    flagged; a GCL run that sits near the collapse value while its positives and negatives separate is not.
    """

    band: float = 0.03  # |loss - collapse_value| < band x collapse_value counts as "at the collapse value"
    gap: float = 0.05  # pos_cosine - neg_cosine below this: positives are no closer than negatives

    def collapsed(self, row: dict[str, float]) -> str | None:
        if "collapse_value" not in row:
            return None
        value = row["collapse_value"]
        near = abs(row["loss"] - value) < self.band * max(value, 1e-6)
        spread = row.get("embedding_spread", 1.0)
        pos, neg = row.get("pos_cosine", float("nan")), row.get("neg_cosine", float("nan"))
        converged = not (math.isnan(pos) or math.isnan(neg)) and pos - neg < self.gap
        if spread < 1e-3 or (near and (spread < 0.05 or converged)):
            return (f"the loss sits within {100 * self.band:.0f}% of the collapse value {value:.4f} (all embeddings "
                    f"alike: spread {spread:.4f}, positive/negative cosine {pos:.3f}/{neg:.3f}); lower the learning "
                    "rate or check the augmentation")
        if converged and neg > 0.9:
            return (f"positive and negative similarities have converged (cosine {pos:.3f}/{neg:.3f}): every "
                    "embedding points the same way; lower the learning rate or check the augmentation")
        return None


@dataclass
class SelfDistillationCollapse(Monitor):
    usage_floor: float = 0.0  # warn when prototype_usage stays below this (0 = off)
    entropy_ceiling: float = 0.0  # ... or teacher_entropy (nats) stays above this (0 = off)

    def collapsed(self, row: dict[str, float]) -> str | None:
        usage = row.get("prototype_usage", float("nan"))
        entropy = row.get("teacher_entropy", float("nan"))
        one = self.usage_floor > 0 and usage < self.usage_floor
        uniform = self.entropy_ceiling > 0 and entropy > self.entropy_ceiling
        if not (one or uniform):
            return None
        what = ("the teacher sends every crop to the same prototype" if one else
                "the teacher's output is uniform for every crop")
        return (f"self-distillation collapse: {what} (prototype usage {usage:.4f}, floor {self.usage_floor:.4f}; "
                f"teacher entropy {entropy:.3f} nats, ceiling {self.entropy_ceiling:.3f}); lower the learning rate "
                "or check the normalisation of the head's input (e.g. alice.global_batch_norm)")


@dataclass
class SignalBound(Monitor):
    """Collapse when the method's logged ``column`` stays at or above ``bound`` (``above``) or at or below it."""

    column: str = "collapse_signal"
    bound: float = 0.99
    above: bool = True
    message: str = "the features of different inputs are all alike"

    def collapsed(self, row: dict[str, float]) -> str | None:
        value = row.get(self.column, float("nan"))
        if math.isnan(value) or (value < self.bound if self.above else value > self.bound):
            return None
        return f"{self.message} ({self.column} {value:.4f} {'>=' if self.above else '<='} {self.bound})"


__all__ = ["ContrastiveCollapse", "Monitor", "SelfDistillationCollapse", "SignalBound"]
