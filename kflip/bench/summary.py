"""The bench's summary: one row per optimizer (mean +/- std over seeds), its Markdown
table and the report printed at the end of ``kflip bench``."""

from __future__ import annotations

from typing import Callable

import numpy as np

from kflip import stats
from kflip.bench.greedy_search import GREEDY_SUFFIX


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return float(arr.mean()), std


def summarize(runs: list[dict], step_seconds: dict) -> list[dict]:
    """One row per optimizer (in order of appearance) from the per-seed runs.

    ``step_seconds`` maps optimizer names to step times (from
    :func:`time_train_steps`).

    Example:
      >>> from kflip import bench
      >>> runs = [dict(optimizer="bop", seed=s, test_accuracy=a, wall_seconds=10.0,
      ...              state_bytes_per_binary_weight=4.0, flips_per_step=2.0)
      ...         for s, a in [(0, 0.90), (1, 0.92)]]
      >>> row, = bench.summarize(runs, {"bop": 0.004})
      >>> row["seeds"], round(row["test_accuracy_mean"], 4), row["step_ms"]
      ([0, 1], 0.91, 4.0)
    """
    order = list(dict.fromkeys(r["optimizer"] for r in runs))
    bop = step_seconds.get("bop")
    rows = []
    for name in order:
        rs = [r for r in runs if r["optimizer"] == name]
        base = name[: -len(GREEDY_SUFFIX)] if name.endswith(GREEDY_SUFFIX) else name
        acc_mean, acc_std = _mean_std([r["test_accuracy"] for r in rs])
        wall_mean, _ = _mean_std([r["wall_seconds"] for r in rs])
        greedy = name != base
        step = None if greedy else step_seconds.get(name)
        row = {
            "optimizer": name,
            "seeds": [r["seed"] for r in rs],
            "test_accuracy_mean": acc_mean,
            "test_accuracy_std": acc_std,
            "wall_seconds_mean": wall_mean,
            "step_ms": None if step is None else 1e3 * step,
            "step_time_rel_bop": None if (step is None or not bop) else step / bop,
            "state_bytes_per_binary_weight": _mean_std(
                [r["state_bytes_per_binary_weight"] for r in rs]
            )[0],
            "flips_per_step": None if greedy else _mean_std([r["flips_per_step"] for r in rs])[0],
        }
        if greedy:
            row["greedy_seconds_mean"] = _mean_std([r["greedy"]["seconds"] for r in rs])[0]
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The bench table as GitHub-flavoured Markdown.

    Example:
      >>> from kflip import bench
      >>> runs = [dict(optimizer="bop", seed=s, test_accuracy=a, wall_seconds=10.0,
      ...              state_bytes_per_binary_weight=4.0, flips_per_step=2.0)
      ...         for s, a in [(0, 0.90), (1, 0.92)]]
      >>> print(bench.format_table(bench.summarize(runs, {"bop": 0.004})))
      | optimizer | test accuracy (%) | wall s / run | step ms | step time / Bop | state B / binary weight | flips / step |
      |---|---|---|---|---|---|---|
      | bop | 91.00 +/- 1.41 | 10.0 | 4.00 | 1.00 | 4.00 | 2.0 |
    """

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    header = (
        "| optimizer | test accuracy (%) | wall s / run | step ms | step time / Bop "
        "| state B / binary weight | flips / step |"
    )
    lines = [header, "|" + "---|" * 7]
    for r in rows:
        acc = (
            "-"
            if r["test_accuracy_mean"] is None
            else f"{100 * r['test_accuracy_mean']:.2f} +/- {100 * r['test_accuracy_std']:.2f}"
        )
        lines.append(
            f"| {r['optimizer']} | {acc} | {f(r['wall_seconds_mean'], '.1f')} "
            f"| {f(r['step_ms'], '.2f')} | {f(r['step_time_rel_bop'], '.2f')} "
            f"| {f(r['state_bytes_per_binary_weight'], '.2f')} | {f(r['flips_per_step'], '.1f')} |"
        )
    return "\n".join(lines)


def _print_report(results: dict, say: Callable[[str], None]) -> None:
    """The end of ``kflip bench``'s output: table, paired comparison, notes, files."""
    say("")
    say(results["table"])
    comparison = results["paired_vs_bop"]
    if comparison:
        say("\ntest accuracy, paired by seed (same initial weights and data order):")
        say(stats.format_comparison(comparison))
    say(
        f"\n(test accuracy: mean +/- sample std over {len(results['config']['seeds'])} seed(s); "
        "step time: median steady-state XLA train step, measured round-robin in this process)"
    )
    for note in results["notes"]:
        say("note: " + note)
    if results["files"]:
        say("wrote " + ", ".join(results["files"].values()))
    say(f"total {results['bench_seconds']:.0f} s")
