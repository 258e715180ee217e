"""Paired comparisons over seeds: the mean difference with a 95% t-interval.

Two optimizers run on the same seeds (same initial weights and data order) differ by a
paired difference per seed; its mean and Student-t interval say whether one is better
(the interval above 0: a win), worse (below 0) or not distinguishable (a tie).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

# two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30 (beyond: 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class Paired(NamedTuple):
    """Mean of ``a - b`` over ``n`` pairs and its 95% interval [``low``, ``high``]."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        """``"win"`` (interval above 0), ``"loss"`` (below 0) or ``"tie"``."""
        if self.n < 2:
            return "tie"
        return "win" if self.low > 0 else "loss" if self.high < 0 else "tie"


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """The paired difference ``a - b`` with its 95% t-interval (NaN bounds for one pair).

    Example:
      >>> from kflip.stats import paired
      >>> d = paired([97.8, 98.1, 97.5], [97.2, 97.6, 97.4])
      >>> round(d.mean, 2), round(d.low, 2), round(d.high, 2), d.verdict
      (0.4, -0.26, 1.06, 'tie')
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"`a` and `b` must be equally long, non-empty sequences, got {a.shape} and {b.shape}.")
    d = a - b
    n = len(d)
    if n < 2:
        return Paired(float(d[0]), math.nan, math.nan, 1)
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * float(d.std(ddof=1)) / math.sqrt(n)
    return Paired(float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, n)


def compare_runs(runs: Sequence[dict], reference: str = "bop", key: str = "test_accuracy") -> list[dict]:
    """Per optimizer, the paired difference of ``key`` (in points: x100) to ``reference``
    over the seeds both ran; runs are dicts with ``optimizer``, ``seed`` and ``key``.

    Example:
      >>> from kflip.stats import compare_runs
      >>> runs = [dict(optimizer=o, seed=s, test_accuracy=a) for o, s, a in [
      ...     ("bop", 0, 0.970), ("bop", 1, 0.975), ("fliplstm", 0, 0.976), ("fliplstm", 1, 0.978)]]
      >>> [(r["optimizer"], round(r["mean"], 2), r["n"]) for r in compare_runs(runs)]
      [('fliplstm', 0.45, 2)]
    """
    by = {}
    for r in runs:
        by.setdefault(r["optimizer"], {})[r["seed"]] = r[key]
    ref = by.get(reference, {})
    rows = []
    for name, values in by.items():
        seeds = sorted(set(values) & set(ref))
        if name == reference or not seeds:
            continue
        d = paired([100 * values[s] for s in seeds], [100 * ref[s] for s in seeds])
        rows.append(dict(optimizer=name, reference=reference, seeds=seeds, mean=d.mean, low=d.low,
                         high=d.high, n=d.n, verdict=d.verdict))
    return rows


def format_comparison(rows: Sequence[dict]) -> str:
    """One line per row of :func:`compare_runs`.

    Example:
      >>> from kflip.stats import format_comparison
      >>> print(format_comparison([dict(optimizer="fliplstm", reference="bop", mean=0.2,
      ...                               low=-0.1, high=0.5, n=5, verdict="tie")]))
      fliplstm - bop: +0.20 points, 95% CI [-0.10, +0.50] over 5 paired seeds: tie
    """
    return "\n".join(
        f"{r['optimizer']} - {r['reference']}: {r['mean']:+.2f} points, 95% CI "
        f"[{r['low']:+.2f}, {r['high']:+.2f}] over {r['n']} paired seeds: {r['verdict']}"
        for r in rows
    )
