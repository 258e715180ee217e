"""Bop2ndOrder vs larq Bop on scikit-learn's digits (offline), paired over seeds.

Model ``kflip.models.mlp(input_shape=(8, 8, 1), hidden=(256, 256))``, 10 epochs,
batch 64; every optimizer sits in ``larq.optimizers.CaseOptimizer`` with
``tf.keras.optimizers.legacy.Adam(0.01)`` for the float variables. A seed fixes the
initial weights and the shuffling, so runs with the same seed are paired. Reports
mean +- std test accuracy per optimizer and, against Bop, the mean paired difference
with a 95% t-interval.

    python benchmarks/bop2nd_digits.py --seeds 0 1 2 3 4 \
        --out benchmarks/results/bop2nd_digits.json
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402
from kflip._files import write_json  # noqa: E402
import larq as lq  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import stats  # noqa: E402

# name -> the binary optimizer; Bop2ndOrder "paper" = the authors' class defaults.
OPTIMIZERS = {
    "bop": lambda: lq.optimizers.Bop(threshold=1e-6, gamma=1e-3),
    "bop2nd": lambda: kflip.Bop2ndOrder(threshold=1e-6, gamma=1e-6, sigma=1e-2),
    "bop2nd-corrected": lambda: kflip.Bop2ndOrder(
        threshold=1e-6, gamma=1e-6, sigma=1e-2, bias_correction=True),
    # the README's settings for the biased/bias-corrected comparison (section 5.1.1)
    "bop2nd-5.1.1": lambda: kflip.Bop2ndOrder(threshold=1e-6, gamma=1e-7, sigma=1e-3),
}


def run(name, ds, seed, epochs, batch_size):
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    model = kflip.models.mlp(input_shape=ds.input_shape, hidden=(256, 256))
    opt = lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, OPTIMIZERS[name]()),
        default_optimizer=tf.keras.optimizers.legacy.Adam(0.01))
    model.compile(opt, "sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=True)
    start = time.perf_counter()
    model.fit(ds.x_train, ds.y_train, epochs=epochs, batch_size=batch_size, verbose=0)
    seconds = time.perf_counter() - start
    kflip.assert_binary(model)
    _, accuracy = model.evaluate(ds.x_test, ds.y_test, verbose=0)
    return float(accuracy), seconds


def t_interval(diffs, level=0.95):
    diffs = np.asarray(diffs, float)
    n = len(diffs)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * diffs.std(ddof=1) / np.sqrt(n)
    return float(diffs.mean()), float(diffs.mean() - half), float(diffs.mean() + half)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--out", help="write the per-seed results and summary as JSON here")
    args = p.parse_args(argv)
    ds = kflip.data.digits()
    acc = {name: [] for name in args.optimizers}
    secs = {name: [] for name in args.optimizers}
    for seed in args.seeds:
        for name in args.optimizers:
            a, s = run(name, ds, seed, args.epochs, args.batch_size)
            acc[name].append(a)
            secs[name].append(s)
            print(f"seed {seed} {name:18s} test accuracy {a:.4f} ({s:.1f} s)", flush=True)

    summary = {}
    print(f"\n{len(args.seeds)} seeds, {args.epochs} epochs, batch {args.batch_size}")
    for name in args.optimizers:
        a = np.array(acc[name])
        row = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}
        line = f"{name:18s} {100 * row['mean']:.2f} +- {100 * row['std']:.2f} %"
        if name != "bop" and "bop" in acc and len(a) > 1:
            mean, low, high = t_interval(a - np.array(acc["bop"]))
            verdict = "tie" if low <= 0 <= high else ("better" if low > 0 else "worse")
            row["minus_bop"] = {"mean": mean, "ci95": [low, high], "verdict": verdict}
            line += (f"   minus Bop {100 * mean:+.2f} pp, 95% CI "
                     f"[{100 * low:+.2f}, {100 * high:+.2f}] -> {verdict}")
        summary[name] = row
        print(line)
    if args.out:
        write_json(args.out, {"args": vars(args), "accuracy": acc, "seconds": secs,
                              "summary": summary, "tensorflow": tf.__version__})


if __name__ == "__main__":
    main()
