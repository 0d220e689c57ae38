"""The few-label protocol (METHODS.md §5): patient folds, validation splits, label budgets, pretraining pools.

Every draw here is a *hash ordering*: cases are ranked by ``sha256("<purpose>|<seed>|<fold>|<case_id>")``
and the first ones are taken. That makes each draw

- deterministic across machines, Python and NumPy versions (no RNG stream involved);
- independent of the order in which case ids are passed in;
- **nested** for label budgets: the first M cases of one fixed ordering of the fold's training cases, so the
  2-volume set contains the 1-volume set, and every method that asks for (seed, fold, M) gets the same volumes.

Fold k's test set is the k-th of ``folds`` near-equal parts (sizes differ by at most one). The test fold is
never used for pretraining labels, checkpoint selection or tuning: the validation cases are carved from the
remaining (training) cases of the same fold.

**Every label counts.** A run's label budget M is every labelled volume it sees: its training volumes *and*
the validation volumes it uses to choose a checkpoint (:func:`labelled_draw`). By default a run takes no
validation volumes (fixed schedule, last checkpoint), so M is its number of training volumes.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from volcontrast.errors import InputError


@dataclass(frozen=True)
class Split:
    """One fold of the protocol; all id lists are sorted and pairwise disjoint.

    Attributes:
        fold: index of the test fold, ``0 .. folds-1``.
        train: cases whose labels may be used (label budgets are drawn from these).
        val: cases for checkpoint selection / early stopping (carved from the training fold).
        test: the held-out fold; only ever scored.
        seed: the seed the split was drawn with.
        folds: how many folds the split belongs to (0 when unknown).
    """

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]
    seed: int = 0
    folds: int = field(default=0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``from_dict`` inverts it)."""
        return {"fold": self.fold, "folds": self.folds, "seed": self.seed,
                "train": list(self.train), "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        try:
            return cls(fold=int(d["fold"]), train=sorted(d["train"]), val=sorted(d["val"]),
                       test=sorted(d["test"]), seed=int(d.get("seed", 0)), folds=int(d.get("folds", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError("split", f"not a split record ({exc!r})") from None

    @property
    def labelled_ids(self) -> list[str]:
        """All cases of this fold's split (train + val + test), sorted."""
        return sorted([*self.train, *self.val, *self.test])


def _rank(purpose: str, seed: int, fold: int, case_id: str) -> bytes:
    return hashlib.sha256(f"{purpose}|{seed}|{fold}|{case_id}".encode()).digest()


def hash_order(ids: Iterable[str], purpose: str, seed: int, fold: int = -1) -> list[str]:
    """``ids`` in a pseudo-random order fixed by (purpose, seed, fold) and the ids themselves (not their order)."""
    return sorted(set(ids), key=lambda cid: (_rank(purpose, seed, fold, cid), cid))


def _check_ids(case_ids: Sequence[str], what: str) -> list[str]:
    ids = [str(c) for c in case_ids]
    dupes = sorted(c for c, n in Counter(ids).items() if n > 1)
    if dupes:
        raise InputError(what, f"duplicate case ids: {', '.join(dupes[:5])}")
    return sorted(ids)


def kfold_splits(case_ids: Sequence[str], folds: int, seed: int = 0, val_fraction: float = 0.2) -> list[Split]:
    """Split labelled patients into ``folds`` folds; split k tests on fold k.

    Args:
        case_ids: labelled case (patient) ids; order does not matter, duplicates are an error.
        folds: number of folds, >= 2 (a test fold is mandatory) and <= number of cases.
        seed: selects the fold assignment and the validation draw.
        val_fraction: share of each fold's non-test cases used for validation:
            ``n_val = max(1, round(val_fraction · n_trainfold))``, capped so at least one training case stays.

    Returns:
        ``folds`` :class:`Split` objects, ``fold = 0 .. folds-1``; the test folds partition ``case_ids``.

    Raises:
        InputError: folds < 2, more folds than cases, fewer than 2 non-test cases in a fold, a bad
            ``val_fraction`` or duplicate ids.
    """
    ids = _check_ids(case_ids, "case_ids")
    if int(folds) != folds or folds < 2:
        raise InputError("--folds", f"needs at least 2 folds (one is the test fold), got {folds}")
    if len(ids) < folds:
        raise InputError("--folds", f"{folds} folds need at least {folds} labelled cases, got {len(ids)}")
    if not 0.0 < val_fraction < 1.0:
        raise InputError("val_fraction", f"must be in (0, 1), got {val_fraction}")
    order = hash_order(ids, "fold", seed)
    base, extra = divmod(len(order), folds)
    parts, start = [], 0
    for k in range(folds):
        size = base + (k < extra)
        parts.append(order[start:start + size])
        start += size
    splits = []
    for k in range(folds):
        test = set(parts[k])
        rest = [c for c in ids if c not in test]
        if len(rest) < 2:
            raise InputError("case_ids", f"fold {k} leaves {len(rest)} non-test case(s); need >= 2 for train + val")
        n_val = min(max(1, round(val_fraction * len(rest))), len(rest) - 1)
        val = hash_order(rest, "val", seed, k)[:n_val]
        train = sorted(set(rest) - set(val))
        splits.append(Split(fold=k, train=train, val=sorted(val), test=sorted(test), seed=seed, folds=folds))
    return splits


def label_budget_order(split: Split, seed: int) -> list[str]:
    """The fold's training cases in draw order for ``seed``; a budget of M takes the first M."""
    return hash_order(split.train, "budget", seed, split.fold)


def label_budget(split: Split, budget: int, seed: int) -> list[str]:
    """The ``budget`` labelled training volumes for (split, seed), sorted.

    The draw depends only on (seed, fold) and ``split.train``, the same for every method, and is nested:
    ``label_budget(s, m, seed) ⊂ label_budget(s, m + 1, seed)``. Validation and test cases are never drawn.

    Raises:
        InputError: ``budget < 1`` or ``budget > len(split.train)``.
    """
    if int(budget) != budget or budget < 1:
        raise InputError("--labeled", f"label budget must be a positive integer, got {budget}")
    if budget > len(split.train):
        raise InputError("--labeled", f"label budget {budget} exceeds the {len(split.train)} training cases "
                                      f"of fold {split.fold}")
    return sorted(label_budget_order(split, seed)[:budget])


def validation_draw(split: Split, n: int, seed: int) -> list[str]:
    """``n`` of the fold's validation cases (for checkpoint choice), sorted; a nested draw fixed by (seed, fold).

    Raises:
        InputError: ``n < 0`` or ``n`` > the fold's validation cases.
    """
    if int(n) != n or n < 0:
        raise InputError("--val", f"validation volumes must be a non-negative integer, got {n}")
    if n > len(split.val):
        raise InputError("--val", f"{n} validation volumes exceed the {len(split.val)} validation cases "
                                  f"of fold {split.fold}")
    return sorted(hash_order(split.val, "valdraw", seed, split.fold)[:n])


@dataclass(frozen=True)
class LabelledDraw:
    """The labelled volumes one run may read: ``train`` for training, ``val`` for checkpoint choice.

    ``budget`` (M) counts both: every labelled volume the run sees."""

    train: list[str]
    val: list[str]

    @property
    def budget(self) -> int:
        return len(self.train) + len(self.val)

    @property
    def ids(self) -> list[str]:
        return sorted([*self.train, *self.val])


def labelled_draw(split: Split, train: int, val: int, seed: int) -> LabelledDraw:
    """``train`` training volumes (:func:`label_budget`; 0 = every training case) and ``val`` validation volumes
    (:func:`validation_draw`) for (split, seed); the run's budget M is ``train + val``."""
    ids = label_budget(split, train, seed) if train else list(split.train)
    return LabelledDraw(train=ids, val=validation_draw(split, val, seed))


def pretraining_pool(split: Split, all_ids: Iterable[str], transductive: bool = False) -> list[str]:
    """Images (used *without* labels) that pretraining may see for this fold, sorted.

    Args:
        split: the fold.
        all_ids: every case id in the cache, labelled or not.
        transductive: if False (default), the fold's train + val cases plus every id of ``all_ids`` that is
            in none of the split's lists (unlabelled extras) — the test fold is excluded. If True, every image
            including the test fold (as PCL did); say so in the report.
    """
    ids = set(map(str, all_ids)) | set(split.train) | set(split.val)
    if transductive:
        return sorted(ids | set(split.test))
    return sorted(ids - set(split.test))
