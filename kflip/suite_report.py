"""Reports of the task suite (:mod:`kflip.suite`): JSON, Markdown tables, the heat-map.

Functions of :class:`kflip.suite.CellResult` sequences; no TensorFlow.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def cell_json(r) -> dict:
    """A cell's result as JSON (``results.json``'s ``cells``)."""
    d = r.difference
    return {
        "cell": r.cell.name, "model": r.cell.model, "length": r.cell.length,
        "steps": r.cell.steps, "held_out": r.cell.held_out, "seeds": list(r.cell.seeds),
        "rows": [{"optimizer": x.label, "kind": x.spec.kind, "params": dict(x.spec.params),
                  "accuracies": list(x.accuracies), "mean": x.mean, "std": x.std}
                 for x in r.rows],
        "best_baseline": r.best_baseline, "verdict": r.verdict, "speedup": r.speedup,
        "difference": None if d is None else d._asdict(),
        "tuning": {label: [[dict(s.params), acc] for s, acc in scores]
                   for label, scores in r.tuning.items()},
    }


def _pct(mean, std) -> str:
    return "-" if mean is None else f"{100 * mean:.2f} +- {100 * std:.2f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def format_table(results: Sequence) -> str:
    """One Markdown row per cell: accuracy per optimizer, FlipLSTM - best, speed-up."""
    labels = list(dict.fromkeys(x.label for r in results for x in r.rows))
    head = ["cell", "steps", "seeds", *labels, "best baseline", "FlipLSTM - best (95% CI)",
            "verdict", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        by = {x.label: x for x in r.rows}
        accs = [_pct(by[x].mean, by[x].std) if x in by else "-" for x in labels]
        d = r.difference
        diff = "-" if d is None else (f"{d.mean:+.2f}" if d.n < 2 else
                                      f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]")
        speed = "-" if r.speedup is None else f"{r.speedup:.2f}"
        lines.append("| " + " | ".join([r.cell.name, str(r.cell.steps), str(len(r.cell.seeds)),
                                        *accs, r.best_baseline or "-", diff, r.verdict or "-",
                                        speed]) + " |")
    return "\n".join(lines)


def format_tables(results: Sequence, scored: str = "") -> str:
    """The tuning cells' table and the held-out cells' table, each with its tally and the
    tuned baselines' choices (``scored``, if given, names another score in the titles
    and leaves the choices out)."""
    parts = []
    for held, title in ((False, "Cells used for tuning decisions"), (True, "Held-out cells")):
        title += f", {scored}" if scored else ""
        group = [r for r in results if r.cell.held_out == held]
        if not group:
            continue
        verdicts = [r.verdict for r in group]
        tally = ", ".join(_plural(verdicts.count(v), v) for v in ("win", "tie", "loss"))
        parts += [f"### {title}", "", format_table(group), "",
                  f"FlipLSTM against the best baseline: {tally}.", ""]
        for r in group if not scored else ():
            for label, scores in r.tuning.items():
                chosen = next(x.spec for x in r.rows if x.label == label)
                parts.append(f"* {r.cell.name} {label}: {chosen.describe()} (validation "
                             f"{100 * max(a for _, a in scores):.2f}%)")
        parts.append("")
    return "\n".join(parts).rstrip()


def late_scores(results: Sequence, records: dict, weights: str, last: int) -> tuple:
    """The cells of ``results`` again, each test run scored by the mean of its ``last``
    test evaluations (the last ``last`` points of its curve) instead of its final one.

    A steadier score where test accuracy jumps between evaluations (the residual net
    moves by up to 18 points from one to the next), for checking that a verdict does
    not hang on where a run happened to stop. The tuned baselines keep the points the
    validation split chose. ``records``: ``results.json``'s runs by key; ``weights``:
    the FlipLSTM rows' :func:`kflip.suite.weights_id`.

    >>> from kflip import suite
    >>> cell = suite.Cell("cnn", 250, 250, False, (0, 1))
    >>> curves = {"fliplstm": ([0.9, 0.8, 0.9], [0.9, 0.8, 0.92]),
    ...           "adam-ste": ([0.5, 0.6, 0.95], [0.5, 0.6, 0.96])}
    >>> records = {suite.run_key(cell, suite.FIXED[k], s, "test", "W"): {
    ...     "curve": [[i, a] for i, a in enumerate(c[s])]} for k, c in curves.items() for s in (0, 1)}
    >>> rows = [suite.row(k, suite.FIXED[k], [c[-1] for c in cs]) for k, cs in curves.items()]
    >>> final = suite.compare_cell(cell, rows, [])
    >>> (late,) = late_scores([final], records, "W", last=2)
    >>> final.best_baseline, round(final.difference.mean, 2)   # on the last evaluation
    ('adam-ste', -4.5)
    >>> late.best_baseline, round(late.difference.mean, 2)     # on the mean of the last two
    ('adam-ste', 7.75)
    """
    from kflip import suite

    out = []
    for r in results:
        rows, curves = [], []
        for x in r.rows:
            runs = [records.get(suite.run_key(r.cell, x.spec, s, "test", weights))
                    for s in r.cell.seeds]
            rows.append(suite.row(x.label, x.spec, [
                None if run is None else float(np.mean([a for _, a in run["curve"][-last:]]))
                for run in runs]))
            if x.label == "fliplstm":
                curves = [run["curve"] for run in runs if run is not None]
        out.append(suite.compare_cell(r.cell, rows, curves, r.tuning))
    return tuple(out)


def plot_heatmap(results: Sequence, path: str) -> str:
    """FlipLSTM - best baseline (points) per cell: rows models, columns lengths."""
    from kflip import plots

    models = list(dict.fromkeys(r.cell.model for r in results))
    lengths = sorted({r.cell.length for r in results})
    grid = np.full((len(models), len(lengths)), np.nan)
    text = {}
    for r in results:
        i, j = models.index(r.cell.model), lengths.index(r.cell.length)
        if r.difference is not None:
            grid[i, j] = r.difference.mean
            text[i, j] = f"{r.difference.mean:+.2f}\n{r.verdict}"
    fig = plots._figure(max(2, len(lengths)), height=1.2 + 0.6 * len(models))
    ax = fig.add_subplot()
    finite = grid[np.isfinite(grid)]
    lim = max(0.1, float(np.abs(finite).max())) if finite.size else 1.0
    image = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for (i, j), t in text.items():
        dark = abs(grid[i, j]) > 0.6 * lim
        ax.text(j, i, t, ha="center", va="center", fontsize=8, color="w" if dark else "k")
    held = {r.cell.model for r in results if r.cell.held_out}
    ax.set_yticks(range(len(models)),
                  [m + (" (held out)" if m in held else "") for m in models])
    ax.set_xticks(range(len(lengths)), [f"{n} steps" for n in lengths])
    fig.colorbar(image, ax=ax, label="points")
    ax.set_title("test accuracy: FlipLSTM - best baseline")
    return plots._save(fig, path)


def compare_weights(runs: Sequence[dict], a: str, b: str) -> str:
    """Two FlipLSTM weights in one suite's ``runs`` (``results.json``), paired seed by
    seed: a Markdown row per cell where both ran on the test split, with the mean test
    accuracy of each and ``a - b`` in points with its 95% interval (:mod:`kflip.stats`).
    ``a`` and ``b`` are :func:`kflip.suite.weights_id` values.

    >>> runs = [{"key": f"m|250|fliplstm||weights={w}|seed{s}|test", "cell": "m@250",
    ...          "optimizer": "fliplstm", "seed": s, "split": "test", "test_accuracy": acc}
    ...         for w, s, acc in [("A", 0, .90), ("A", 1, .92), ("B", 0, .89), ("B", 1, .90)]]
    >>> runs.append({"key": "m|250|bop|threshold=1e-06|seed0|test", "cell": "m@250",
    ...              "optimizer": "bop", "seed": 0, "split": "test", "test_accuracy": 0.9})
    >>> print(compare_weights(runs, "A", "B").splitlines()[-1])
    | m@250 | 2 | 91.00 | 89.50 | +1.50 [-4.85, +7.85] | tie |
    """
    from kflip.stats import paired

    acc: dict = {}
    for r in runs:
        if r["optimizer"] != "fliplstm" or r["split"] != "test":
            continue
        weights = r["key"].split("|weights=")[1].split("|")[0]  # only the key names them
        if weights in (a, b):
            acc.setdefault(r["cell"], {a: {}, b: {}})[weights][r["seed"]] = 100 * r["test_accuracy"]
    lines = ["| cell | seeds | a | b | a - b (95% CI) | verdict |", "|---|---|---|---|---|---|"]
    for name, by in acc.items():
        seeds = sorted(set(by[a]) & set(by[b]))
        if not seeds:
            continue
        xa, xb = [by[a][s] for s in seeds], [by[b][s] for s in seeds]
        d = paired(xa, xb)
        ci = f" [{d.low:+.2f}, {d.high:+.2f}]" if d.n > 1 else ""
        lines.append(f"| {name} | {len(seeds)} | {np.mean(xa):.2f} | {np.mean(xb):.2f} | "
                     f"{d.mean:+.2f}{ci} | {d.verdict} |")
    return "\n".join(lines)
