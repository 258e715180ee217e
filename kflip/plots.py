"""PNG plots of ``kflip bench`` results (matplotlib, no global pyplot state).

* :func:`plot_accuracy_vs_step`: test accuracy vs training step, one panel per
  optimizer side by side with a shared y axis over the second half of training (the
  layout of the invention's Figure 5); thin lines are seeds, the thick line their
  mean, a star (with its value) the accuracy after the greedy flip search.
* :func:`plot_flip_rate`: flips per weight per step of every binary layer over
  training, one panel per optimizer (mean over seeds, log scale).

Both take the ``runs`` list of :func:`kflip.bench.bench` (or ``results.json``) and
return the path written.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

GREEDY_SUFFIX = "+greedy"


def _figure(n_panels: int, height: float = 3.4):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Plots need matplotlib: pip install 'kflip[plots]'.") from e
    fig = Figure(figsize=(max(3.2 * n_panels, 4.0), height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _base_optimizers(runs: Sequence[dict]) -> list[str]:
    names = [r["optimizer"] for r in runs if not r["optimizer"].endswith(GREEDY_SUFFIX)]
    return list(dict.fromkeys(names))


def _save(fig, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _check_runs(runs):
    if not runs:
        raise ValueError("`runs` must hold at least one run.")


def plot_accuracy_vs_step(runs: Sequence[dict], path: str, title: str | None = None) -> str:
    """Test accuracy vs step, one panel per optimizer, side by side.

    The shared y axis spans the second half of training (where optimizers differ) and
    the greedy results, not the chance-level start; greedy stars carry their value.
    Each run needs ``optimizer``, ``test_curve`` (``step``, ``test_accuracy``) and
    ``test_accuracy``; ``<optimizer>+greedy`` runs also ``steps``.

    Example:
      >>> import os, tempfile
      >>> from kflip import plots
      >>> points = [(0, 0.1), (10, 0.8), (20, 0.9)]
      >>> curve = [{"step": s, "test_accuracy": a} for s, a in points]
      >>> runs = [{"optimizer": "fliplstm", "test_curve": curve, "test_accuracy": 0.9}]
      >>> out = tempfile.mkdtemp()
      >>> path = plots.plot_accuracy_vs_step(runs, os.path.join(out, "acc.png"))
      >>> os.path.basename(path), os.path.getsize(path) > 0
      ('acc.png', True)
    """
    _check_runs(runs)
    names = _base_optimizers(runs)
    fig = _figure(len(names))
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    shown = []  # accuracies the y range must hold
    for ax, name in zip(axes, names):
        rs = [r for r in runs if r["optimizer"] == name]
        shown += _accuracy_panel(ax, name, rs)
        greedy = [r for r in runs if r["optimizer"] == name + GREEDY_SUFFIX]
        if greedy:
            shown += _greedy_stars(ax, greedy)
        ax.set_xlabel("training step")
        ax.margins(x=0.06)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    lo, hi = min(shown), max(shown)
    pad = max(0.5, 0.15 * (hi - lo))
    axes[0].set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    axes[0].set_ylabel("test accuracy (%)")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _accuracy_panel(ax, name: str, rs: Sequence[dict]) -> list[float]:
    """Seeds thin, their mean thick; returns the late-training accuracies drawn."""
    curves = []
    for r in rs:
        steps = [p["step"] for p in r["test_curve"]]
        acc = [100 * p["test_accuracy"] for p in r["test_curve"]]
        ax.plot(steps, acc, lw=0.8, alpha=0.45, color="C0")
        curves.append((steps, acc))
    n = min(len(c[0]) for c in curves)
    mean = np.mean([c[1][:n] for c in curves], axis=0)
    ax.plot(curves[0][0][:n], mean, lw=2.0, color="C0", label=f"{name} (mean of {len(rs)})")
    final = 100 * np.mean([r["test_accuracy"] for r in rs])
    ax.set_title(f"{name}\nfinal {final:.2f}%", fontsize=10)
    late = [a for steps, acc in curves for s, a in zip(steps, acc) if s >= steps[-1] / 2]
    return late or [a for _, acc in curves for a in acc]


def _greedy_stars(ax, greedy: Sequence[dict]) -> list[float]:
    values = [100 * r["test_accuracy"] for r in greedy]
    steps = [r["steps"] for r in greedy]
    ax.scatter(steps, values, marker="*", s=90, color="C3", zorder=3, clip_on=False,
               label="+ greedy flip search")
    mean = float(np.mean(values))
    ax.annotate(f"{mean:.2f}%", (steps[0], mean), textcoords="offset points", xytext=(-6, 8),
                ha="right", fontsize=8, color="C3")
    return values


def plot_flip_rate(runs: Sequence[dict], path: str, title: str | None = None) -> str:
    """Flip rate (flips per weight per step) per binary layer, one panel per optimizer.

    Each run needs ``optimizer``, ``flips_per_step`` and ``flip_curve``: entries with
    ``step`` and ``flip_rate/<layer>/<weight>`` (as :class:`kflip.bench.SignFlipCounter`
    records them).

    Example:
      >>> import os, tempfile
      >>> from kflip import plots
      >>> key = "flip_rate/quant_dense/kernel"
      >>> flips = [{"step": 10, key: 1e-2}, {"step": 20, key: 1e-3}]
      >>> runs = [{"optimizer": "fliplstm", "flip_curve": flips, "flips_per_step": 5.0}]
      >>> path = plots.plot_flip_rate(runs, os.path.join(tempfile.mkdtemp(), "flips.png"))
      >>> os.path.getsize(path) > 0
      True
    """
    _check_runs(runs)
    names = _base_optimizers(runs)
    fig = _figure(len(names))
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, names):
        rs = [r for r in runs if r["optimizer"] == name and r.get("flip_curve")]
        if not rs:
            ax.set_title(f"{name}\n(no flip telemetry)", fontsize=10)
            continue
        n = min(len(r["flip_curve"]) for r in rs)
        steps = [e["step"] for e in rs[0]["flip_curve"][:n]]
        layers = [k for k in rs[0]["flip_curve"][0] if k.startswith("flip_rate/")]
        for i, key in enumerate(layers):
            rate = np.mean([[e[key] for e in r["flip_curve"][:n]] for r in rs], axis=0)
            rate = np.where(rate > 0, rate, np.nan)  # log scale: gaps where nothing flipped
            ax.plot(steps, rate, lw=1.2, color=f"C{i % 10}", label=_layer_label(i, key))
        if all(r["flips_per_step"] == 0 for r in rs):
            ax.text(0.5, 0.5, "no sign flips", transform=ax.transAxes, ha="center")
        else:
            ax.set_yscale("log")
        ax.set_title(f"{name}\n{np.mean([r['flips_per_step'] for r in rs]):.1f} flips/step", fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best", framealpha=0.6)
    axes[0].set_ylabel("flips per weight per step")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _layer_label(i: int, key: str) -> str:
    """``flip_rate/quant_dense_1/kernel`` -> ``layer 2 (quant_dense_1)``."""
    name = key.split("/", 1)[1].split("/")[0]
    return f"layer {i + 1} ({name})"


def plot_results(results, output_dir: str) -> dict:
    """Both plots of a bench ``results`` dict (or the path of its ``results.json``).

    Writes ``accuracy_vs_step.png`` and ``flip_rate.png`` into ``output_dir``;
    returns ``{"accuracy_plot": path, "flip_rate_plot": path}``.

    Example:
      >>> import tempfile
      >>> from kflip import plots
      >>> points = [(0, 0.1), (10, 0.8), (20, 0.9)]
      >>> curve = [{"step": s, "test_accuracy": a} for s, a in points]
      >>> runs = [{"optimizer": "fliplstm", "test_curve": curve, "test_accuracy": 0.9}]
      >>> files = plots.plot_results({"runs": runs, "config": {}}, tempfile.mkdtemp())
      >>> sorted(files)  # a run without flip_curve gets a "no flip telemetry" panel
      ['accuracy_plot', 'flip_rate_plot']
    """
    if isinstance(results, (str, os.PathLike)):
        import json

        with open(results) as f:
            results = json.load(f)
    runs, cfg = results["runs"], results.get("config", {})
    title = (
        f"{cfg.get('dataset', '?')}, {cfg.get('model', '?')}, {cfg.get('epochs', '?')} epochs, "
        f"{len(cfg.get('seeds', [])) or '?'} seed(s)"
    )
    return {
        "accuracy_plot": plot_accuracy_vs_step(
            runs, os.path.join(output_dir, "accuracy_vs_step.png"), title=title
        ),
        "flip_rate_plot": plot_flip_rate(runs, os.path.join(output_dir, "flip_rate.png"), title=title),
    }
