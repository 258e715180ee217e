"""Greedy flip search after gradient training: probe loss, train loss, test accuracy.

Two settings (kflip issue 4):

* ``--setting bar``: the 2x512 BinaryNet MLP trained 6 epochs (batch 64, XLA) on MNIST
  with Bop (or ``--optimizer fliplstm``), then one greedy pass (front to back, index
  order, 2,048-example probe set; ``--max-seconds`` per layer, because an exact
  sequential pass over the 668k weights does not fit the time box on this machine).
* ``--setting small``: the invention's own setting, a small binary MLP whose
  gradient-trained MNIST accuracy is around 84% (``--hidden``, default 784-8-10 binary,
  Bop, ``--epochs``), then greedy passes over all its weights on a larger probe set.

Prints one JSON line per seed and a summary; ``--json`` writes them to a file.

Usage:
  python benchmarks/greedy_accuracy.py --setting bar --seeds 0 1 2
  python benchmarks/greedy_accuracy.py --setting small --seeds 0 1 2
  python benchmarks/greedy_accuracy.py --setting small --hidden 16 --default-pass
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402  (selects Keras 2)
import larq as lq  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import data, models  # noqa: E402
from kflip._files import write_json  # noqa: E402


def optimizer(name):
    if name == "bop":
        return lq.optimizers.CaseOptimizer(
            (lq.optimizers.Bop.is_binary_variable, lq.optimizers.Bop(threshold=1e-6, gamma=1e-3)),
            default_optimizer=tf.keras.optimizers.legacy.Adam(0.01),
        )
    if name == "fliplstm":
        return kflip.FlipLSTM()
    raise ValueError(f"`optimizer` must be 'bop' or 'fliplstm', got {name!r}.")


def measure(model, ds, xp, yp):
    ev = lambda x, y: model.evaluate(x, y, batch_size=2048, verbose=0)  # noqa: E731
    probe_loss, _ = ev(xp, yp)
    train_loss, train_acc = ev(ds.x_train, ds.y_train)
    test_loss, test_acc = ev(ds.x_test, ds.y_test)
    return dict(probe_loss=probe_loss, train_loss=train_loss, train_acc=train_acc,
                test_loss=test_loss, test_acc=test_acc)


def run(args, seed, ds):
    tf.keras.utils.set_random_seed(seed)
    hidden = tuple(args.hidden)
    model = models.mlp(ds.input_shape, ds.num_classes, hidden=hidden)
    model.compile(optimizer(args.optimizer), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=True)
    t0 = time.perf_counter()
    model.fit(ds.x_train, ds.y_train, batch_size=64, epochs=args.epochs, verbose=0)
    train_s = time.perf_counter() - t0
    kflip.snap_binary_weights(model)
    idx = np.sort(np.random.RandomState(seed).choice(len(ds.x_train), args.probe_size, replace=False))
    xp, yp = ds.x_train[idx], ds.y_train[idx]
    before = measure(model, ds, xp, yp)
    if args.default_pass:  # kflip's defaults: 16,384 training examples, 60 s, calibrated
        rep = kflip.greedy_flip(model, ds.x_train, ds.y_train, probe_seed=seed, verbose=0)
    else:
        rep = kflip.greedy_flip(model, xp, yp, probe_size=None, passes=args.passes,
                                max_seconds=args.max_seconds, order=args.order,
                                min_delta=args.min_delta, block_size=args.block_size,
                                calibrate=args.calibrate, time_budget=None, verbose=0)
    kflip.assert_binary(model)
    after = measure(model, ds, xp, yp)
    row = dict(
        seed=seed, setting=args.setting, optimizer=args.optimizer, hidden=list(hidden),
        epochs=args.epochs, probe_size=args.probe_size, train_seconds=train_s,
        greedy_seconds=rep.seconds, tried=rep.tried, accepted=rep.accepted,
        greedy_probe_loss_before=rep.loss_before, greedy_probe_loss_after=rep.loss_after,
        layers=[dict(name=l.name, pass_index=l.pass_index, candidates=l.candidates, tried=l.tried,
                     accepted=l.accepted, stop=l.stop_reason) for l in rep.layers],
        before=before, after=after,
    )
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=["bar", "small"], default="bar")
    ap.add_argument("--optimizer", choices=["bop", "fliplstm"], default="bop")
    ap.add_argument("--data-dir", default="/work/shared/data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hidden", type=int, nargs="+", default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--probe-size", type=int, default=None)
    ap.add_argument("--passes", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--order", default="index")
    ap.add_argument("--min-delta", type=float, default=1e-6)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                    help="greedy_flip(calibrate=False): no temperature fit")
    ap.add_argument("--default-pass", action="store_true",
                    help="one greedy_flip pass with kflip's defaults instead of the options above")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    small = args.setting == "small"
    defaults = dict(hidden=[8] if small else [512, 512], epochs=1 if small else 6,
                    probe_size=10000 if small else 2048, passes=3 if small else 1,
                    max_seconds=300.0 if small else 180.0)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    ds = data.load("mnist", data_dir=args.data_dir)
    rows = [run(args, s, ds) for s in args.seeds]
    summary = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), setting=args.setting,
        optimizer=args.optimizer, seeds=args.seeds,
        test_acc_before=[r["before"]["test_acc"] for r in rows],
        test_acc_after=[r["after"]["test_acc"] for r in rows],
        mean_test_acc_gain=float(np.mean([r["after"]["test_acc"] - r["before"]["test_acc"] for r in rows])),
    )
    print(json.dumps(summary), flush=True)
    if args.json:
        write_json(args.json, dict(summary=summary, runs=rows))


if __name__ == "__main__":
    main()
