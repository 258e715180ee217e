"""Evaluate meta-learned FlipLSTM weights on MNIST (never seen in meta-training).

Compares, with the bar's recipe (MNIST, 6 epochs, batch 64, ``jit_compile=True``):

* ``bop``: larq Bop (CaseOptimizer with Adam(0.01) for float variables), gamma and
  threshold picked by a small sweep on a 5k validation split of the training set
  (``--sweep``; the sweep uses the MLP, ``--sweep-epochs`` epochs and one seed);
* ``FlipLSTM(weights=...)`` for every ``--flip NAME=SPEC`` (SPEC: a path to an
  ``.npz``, ``analytic`` for ``kflip.bop_weights()`` = the bar's Bop inside the LSTM,
  or ``analytic-normalized:THRESHOLD,GAMMA,SCALE``).

Every finished run is appended to ``--runs`` (a JSON list, rewritten after each run),
so the benchmark can be interrupted and restarted: runs already present are skipped.
``--summary`` gets mean/std per (model, method).

    nohup python benchmarks/meta_eval.py --sweep --flip analytic=analytic \
        --flip learned=kflip/weights/default.npz > /tmp/meta_eval.log 2>&1 &
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402  (selects Keras 2 first)
import larq as lq  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import data, models  # noqa: E402
from kflip._files import write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SWEEP_GAMMAS = (1e-4, 1e-3, 1e-2)
SWEEP_THRESHOLDS = (1e-7, 1e-6, 1e-5)


def bop(threshold: float, gamma: float):
    return lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, lq.optimizers.Bop(threshold=threshold, gamma=gamma)),
        default_optimizer=tf.keras.optimizers.legacy.Adam(0.01),
    )


def flip_weights(spec: str):
    if spec == "analytic":
        return kflip.bop_weights()
    if spec.startswith("analytic-normalized:"):
        thr, gamma, scale = (float(s) for s in spec.split(":", 1)[1].split(","))
        return kflip.bop_weights(thr, gamma, normalized=True, scale=scale)
    return kflip.LSTMWeights.load(spec)


def train_eval(model_name, make_opt, ds, seed, epochs, batch_size=64):
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    model = models.build(model_name, ds.input_shape, ds.num_classes)
    model.compile(
        optimizer=make_opt(),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    t0 = time.time()
    hist = model.fit(ds.x_train, ds.y_train, batch_size=batch_size, epochs=epochs, verbose=0)
    train_time = time.time() - t0
    if isinstance(model.optimizer, kflip.FlipLSTM):
        kflip.assert_binary(model)  # flips keep the kernels exactly +-1
    loss, acc = model.evaluate(ds.x_test, ds.y_test, batch_size=1000, verbose=0)
    return {
        "test_accuracy": float(acc),
        "test_loss": float(loss),
        "train_loss_last_epoch": float(hist.history["loss"][-1]),
        "train_time_s": train_time,
    }


def _load_runs(path):
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    return []


def _save_json(path, obj):
    write_json(path, obj, sort_keys=True)


def _key(r):
    return (r["stage"], r["model"], r["method"], r["seed"], r["epochs"], json.dumps(r.get("hyper", {}), sort_keys=True))


def all_runs(runs_path):
    """Runs from every ``meta_eval_runs*.json`` beside ``runs_path`` (several
    processes may run disjoint parts of the benchmark, each with its own file)."""
    import glob

    d = os.path.dirname(os.path.abspath(runs_path))
    out = []
    for path in sorted(glob.glob(os.path.join(d, "meta_eval_runs*.json"))):
        out += _load_runs(path)
    return out


def summarize(runs):
    out = {}
    for r in runs:
        if r["stage"] != "eval":
            continue
        k = f"{r['model']}/{r['method']}"
        out.setdefault(k, []).append(r["test_accuracy"])
    return {
        k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v), "accs": v}
        for k, v in sorted(out.items())
    }


def init_sweep(path):
    """Pick the normalised Bop init on meta-training tasks only (no MNIST)."""
    import itertools

    from kflip.meta import tasks, unroll

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keys = [("mlp-32", "digits", 1), ("mlp-64-64", "digits-proj", 2), ("mlp-128", "teacher", 3),
            ("mlp-32", "teacher", 4), ("mlp-64-64", "digits-perm", 5)]
    inner = [tasks.make_task(f, d, s, 2000) for f, d, s in keys]
    ev = unroll.Evaluator(1, 0.99, 1e-20)
    rules = [("raw", 1e-6, 1e-3), ("raw", 1e-7, 1e-4)] + [
        ("normalized", t, g) for t, g in itertools.product([0.01, 0.03, 0.1, 0.3], [1e-3, 3e-3, 1e-2])
    ]
    out = []
    for kind, thr, gamma in rules:
        w = kflip.bop_weights(thr, gamma, normalized=kind == "normalized", scale=1.0 if kind == "normalized" else 1e-2)
        rs = [ev(unroll.flatten(w), t) for t in inner]
        out.append({"kind": kind, "threshold": thr, "gamma": gamma,
                    "meta_loss": float(np.mean([r["meta_loss"] for r in rs])),
                    "held_out_accuracy": float(np.mean([r["held_out_accuracy"] for r in rs])),
                    "flip_fraction": float(np.mean([r["flip_fraction"] for r in rs]))})
        print(json.dumps(out[-1]), flush=True)
    _save_json(path, {"tasks": keys, "horizon": 2000, "results": out,
                      "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")})


def _parse_args(argv):
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--sweep", action="store_true", help="pick Bop gamma/threshold on a 5k validation split")
    p.add_argument("--sweep-epochs", type=int, default=2)
    p.add_argument("--bop", default=None, help="THRESHOLD,GAMMA for Bop (skips the sweep result)")
    p.add_argument("--no-bop", action="store_true")
    p.add_argument("--flip", action="append", default=[], help="NAME=SPEC, repeatable")
    p.add_argument("--runs", default=os.path.join(RESULTS, "meta_eval_runs.json"))
    p.add_argument("--summary", default=os.path.join(RESULTS, "meta_eval.json"))
    p.add_argument("--order", default="method", choices=["method", "seed"],
                   help="loop order: all seeds of one method first, or one seed of every method first")
    p.add_argument("--init-sweep", action="store_true",
                   help="only score Bop inits on meta-training tasks (no MNIST) -> results/meta_init_sweep.json")
    return p.parse_args(argv)


def _recorder(runs_path, runs, done):
    """A function that stamps a finished run, adds it to ``runs``/``done``, saves and prints it."""
    command = "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:])

    def record(r):
        r["date"] = datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        r["command"] = command
        runs.append(r)
        done.add(_key(r))
        _save_json(runs_path, runs)
        print(json.dumps(r), flush=True)

    return record


def _sweep_bop(args, ds, runs, done, record):
    """Bop sweep on a 5k validation split (MLP, one seed); returns the best hyperparameters."""
    val = ds.validation_split(5000)
    best = None
    for gamma in SWEEP_GAMMAS:
        for thr in SWEEP_THRESHOLDS:
            hyper = {"threshold": thr, "gamma": gamma}
            r = {"stage": "sweep", "model": "mlp", "method": "bop", "seed": 0,
                 "epochs": args.sweep_epochs, "hyper": hyper}
            if _key(r) in done:
                r = next(x for x in runs if _key(x) == _key(r))
            else:
                r.update(train_eval("mlp", lambda: bop(thr, gamma), val, 0, args.sweep_epochs))
                r["val_accuracy"] = r.pop("test_accuracy")
                record(r)
            if best is None or r["val_accuracy"] > best[0]:
                best = (r["val_accuracy"], hyper)
    print("bop sweep picked", best[1], "val acc", best[0], flush=True)
    return best[1]


def _bop_hyper(args, ds, runs, done, record):
    """Bop's threshold and gamma: the default, the ``--sweep`` pick, or ``--bop`` (which wins)."""
    bop_hyper = {"threshold": 1e-6, "gamma": 1e-3}
    if args.sweep:
        bop_hyper = _sweep_bop(args, ds, runs, done, record)
    if args.bop:
        thr, gamma = (float(s) for s in args.bop.split(","))
        bop_hyper = {"threshold": thr, "gamma": gamma}
    return bop_hyper


def _methods(args, bop_hyper):
    """(name, hyper, optimizer factory) for Bop (unless ``--no-bop``) and every ``--flip``."""
    methods = []
    if not args.no_bop:
        methods.append(("bop", bop_hyper, lambda h=bop_hyper: bop(h["threshold"], h["gamma"])))
    for item in args.flip:
        name, spec = item.split("=", 1)
        w = flip_weights(spec)
        methods.append((name, {"weights": spec}, lambda w=w: kflip.FlipLSTM(weights=w)))
    return methods


def _jobs(args, methods):
    """(model, method, seed) triples in ``--order``."""
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = []
    for model_name in args.models.split(","):
        if args.order == "method":
            jobs += [(model_name, m, s) for m in methods for s in seeds]
        else:
            jobs += [(model_name, m, s) for s in seeds for m in methods]
    return jobs


def main(argv=None):
    args = _parse_args(argv)
    os.makedirs(os.path.dirname(args.runs), exist_ok=True)
    if args.init_sweep:
        return init_sweep(os.path.join(RESULTS, "meta_init_sweep.json"))
    ds = data.load("mnist", data_dir=args.data_dir)
    runs = _load_runs(args.runs)
    done = {_key(r) for r in runs}
    record = _recorder(args.runs, runs, done)

    bop_hyper = _bop_hyper(args, ds, runs, done, record)
    methods = _methods(args, bop_hyper)
    for model_name, (name, hyper, make), seed in _jobs(args, methods):
        r = {"stage": "eval", "model": model_name, "method": name, "seed": seed,
             "epochs": args.epochs, "hyper": hyper}
        if _key(r) in done:
            continue
        r.update(train_eval(model_name, make, ds, seed, args.epochs))
        record(r)
        write_summary(args, bop_hyper)
    print(json.dumps(write_summary(args, bop_hyper), indent=1))


def write_summary(args, bop_hyper):
    runs = all_runs(args.runs)
    summary = summarize(runs)
    _save_json(args.summary, {"summary": summary, "bop_hyper": bop_hyper,
                              "sweep": [x for x in runs if x["stage"] == "sweep"]})
    return summary


if __name__ == "__main__":
    main()
