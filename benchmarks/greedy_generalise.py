"""Does a greedy pass after training raise test accuracy? Acceptance rules side by side.

Loads models trained by ``kflip train`` (each ``DIR/model.keras``), and for every rule
runs one greedy pass on a fresh copy of the weights (same budget) and measures test
accuracy before and after. Rules (``--rules``, any of):

* ``probe``: the invention's test on a 2,048-example probe (``min_delta=1e-6``);
* ``p4k``, ``p8k``, ``large``, ``xl``: the same test on a 4,096- / 8,192- / 16,384- /
  32,768-example probe;
* ``uncalibrated``: ``probe`` without the temperature fit (``calibrate=False``);
* ``holdout``: an 8,192-example probe, and after each layer the layer's flips are kept
  only if the loss on 8,192 other training examples dropped (else reverted);
* ``large-holdout``: a 16,384 probe with an 8,192 holdout.

Prints one JSON line per (model, rule) and the paired test-accuracy change per rule.

Usage:
  kflip train --dataset mnist --data-dir ../shared/data --model mlp --seed 0 --output runs/mlp-s0
  python benchmarks/greedy_generalise.py --data-dir ../shared/data runs/mlp-s*
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402  (selects Keras 2)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import data  # noqa: E402
from kflip._files import write_json  # noqa: E402

RULES = {
    "probe": dict(probe_size=2048),
    "p4k": dict(probe_size=4096),
    "p8k": dict(probe_size=8192),
    "large": dict(probe_size=16384),
    "xl": dict(probe_size=32768),
    "uncalibrated": dict(probe_size=2048, calibrate=False),
    "holdout": dict(probe_size=8192, holdout=8192),
    "large-holdout": dict(probe_size=16384, holdout=8192),
}


def _accuracy(model, ds):
    return 100.0 * float(model.evaluate(ds.x_test, ds.y_test, batch_size=2048, verbose=0)[1])


def _interval(d):
    d = np.asarray(d, float)
    if len(d) < 2:
        return float(d.mean()), float("nan")
    from scipy import stats

    return float(d.mean()), float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="directories with model.keras")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    ap.add_argument("--time-budget", type=float, default=60.0)
    ap.add_argument("--order", default="gradient")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ds = data.load(args.dataset, data_dir=args.data_dir)
    rows = []
    for run in args.runs:
        model = tf.keras.models.load_model(os.path.join(run, "model.keras"))
        model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        kflip.snap_binary_weights(model)
        start = [v.numpy() for v in model.weights]
        before = _accuracy(model, ds)
        for rule in args.rules:
            for v, w in zip(model.weights, start):
                v.assign(w)
            rep = kflip.greedy_flip(model, ds.x_train, ds.y_train, order=args.order,
                                    time_budget=args.time_budget, verbose=0, **RULES[rule])
            kflip.assert_binary(model)
            row = dict(run=run, rule=rule, before=before, after=_accuracy(model, ds),
                       layers=[[lr.name, lr.tried, lr.accepted, round(lr.seconds, 1)] for lr in rep.layers],
                       accepted=rep.accepted, tried=rep.tried, reverted=rep.reverted,
                       probe_loss_before=rep.loss_before, probe_loss_after=rep.loss_after,
                       seconds=rep.seconds)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for rule in args.rules:
        d = [r["after"] - r["before"] for r in rows if r["rule"] == rule]
        mean, half = _interval(d)
        print(f"{rule:14s} test accuracy change {mean:+.3f} +- {half:.3f} (95% CI, n={len(d)}); "
              f"per model {', '.join(f'{x:+.2f}' for x in d)}; worst {min(d):+.2f}")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
