"""FlipLSTM vs larq Bop vs Adam+STE on MNIST, side by side in one run.

Measures, per optimizer and seed: test accuracy after each epoch, wall time,
steady-state train-step time (XLA) and optimizer-state bytes per binary weight.
Step times are measured in the same process, interleaved, so their ratio to Bop is
fair even on a shared machine.

    python benchmarks/fliplstm_mnist.py --data-dir ../shared/data --seeds 0 1 2 \
        --epochs 6 --out benchmarks/results/fliplstm_mnist_mlp.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402
import larq as lq  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import data, models, stats  # noqa: E402
from kflip._files import write_json  # noqa: E402


def make_optimizer(name: str, args):
    adam_floats = tf.keras.optimizers.legacy.Adam(0.01)
    if name == "adam-ste":
        return tf.keras.optimizers.legacy.Adam(1e-3)
    if name == "bop":
        return lq.optimizers.CaseOptimizer(
            (lq.optimizers.Bop.is_binary_variable, lq.optimizers.Bop(threshold=1e-6, gamma=1e-3)),
            default_optimizer=adam_floats,
        )
    if name == "fliplstm":
        return kflip.FlipLSTM(args.lstm_weights, adam_floats)
    if name == "fliplstm-gradient":
        return kflip.FlipLSTM(args.lstm_weights, adam_floats, output="gradient",
                              learning_rate=args.gradient_lr)
    raise ValueError(name)


def state_bytes(name: str, opt) -> float:
    if name == "adam-ste":
        return 8.0
    if name == "bop":
        return 4.0
    return float(opt.state_bytes_per_weight)


def build(model_name, ds, seed):
    tf.keras.utils.set_random_seed(seed)
    return models.build(model_name, ds.input_shape, ds.num_classes)


def train_one(name, model_name, ds, seed, args):
    model = build(model_name, ds, seed)
    opt = make_optimizer(name, args)
    model.compile(opt, "sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=True)
    accs = []

    class EvalEachEpoch(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            accs.append(float(model.evaluate(ds.x_test, ds.y_test, batch_size=1000, verbose=0)[1]))

    callbacks = [EvalEachEpoch()]
    if name.startswith("fliplstm"):
        rate = kflip.FlipRate()
        callbacks.insert(0, rate)
    t0 = time.perf_counter()
    hist = model.fit(ds.x_train, ds.y_train, batch_size=args.batch_size, epochs=args.epochs,
                     verbose=0, callbacks=callbacks)
    wall = time.perf_counter() - t0
    row = {"optimizer": name, "seed": seed, "test_acc": accs, "final_test_acc": accs[-1],
           "train_loss": hist.history["loss"], "wall_s": wall, "state_bytes_per_binary_weight": state_bytes(name, opt)}
    if "flip_rate" in hist.history:
        row["flip_rate"] = hist.history["flip_rate"]
    if name.startswith("fliplstm"):
        kflip.assert_binary(model) if name == "fliplstm" else None
    return row


def step_times(names, model_name, ds, args, repeats=5, steps=50):
    """Median steady-state XLA train-step time per optimizer, interleaved.

    Returns the median over all timed steps of wall-clock and process-CPU seconds
    per step; timing steps one by one lets the median drop steps that were
    preempted on a shared machine.
    """
    fns = {}
    x = tf.constant(ds.x_train[: args.batch_size])
    y = tf.constant(ds.y_train[: args.batch_size])
    for name in names:
        model = build(model_name, ds, 0)
        model.compile(make_optimizer(name, args), "sparse_categorical_crossentropy", jit_compile=True)
        model.train_on_batch(x, y)  # compile
        fns[name] = model
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for _ in range(repeats):
        for name, model in fns.items():
            model.train_on_batch(x, y)
            for _ in range(steps):  # per-step times: the median ignores preempted steps
                t0, c0 = time.perf_counter(), time.process_time()
                model.train_on_batch(x, y)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = lambda d: {n: float(np.median(t)) for n, t in d.items()}  # noqa: E731
    return med(times), med(cpu)


def first_step_times(names, model_name, ds, args, repeats=3):
    """Times to the first finished train step (tracing + XLA compilation) per
    optimizer, one list per optimizer: a fresh model and optimizer each time. One
    warm-up round is discarded (the process's first XLA compilation pays one-off
    costs), then ``repeats`` rounds alternate the optimizers' order."""
    x = tf.constant(ds.x_train[: args.batch_size])
    y = tf.constant(ds.y_train[: args.batch_size])
    times = {n: [] for n in names}
    for r in range(repeats + 1):
        for name in names if r % 2 else names[::-1]:
            tf.keras.backend.clear_session()
            model = build(model_name, ds, 0)
            t0 = time.perf_counter()
            model.compile(make_optimizer(name, args), "sparse_categorical_crossentropy",
                          metrics=args.first_step_metrics, jit_compile=True)
            model.train_on_batch(x, y)
            if r:
                times[name].append(time.perf_counter() - t0)
    return times


def ratio_interval(times, name, reference="bop"):
    """Geometric mean of the per-round ratios ``times[name] / times[reference]`` and
    its 95% t-interval (rounds are paired: both ran back to back)."""
    d = stats.paired(np.log(times[name]), np.log(times[reference]))
    return {"ratio": float(np.exp(d.mean)), "low": float(np.exp(d.low)), "high": float(np.exp(d.high)),
            "rounds": len(times[name])}


def _parse_args(argv):
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--optimizers", nargs="+", default=["adam-ste", "bop", "fliplstm", "fliplstm-gradient"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lstm-weights", default=None)
    p.add_argument("--gradient-lr", type=float, default=1e-2)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--timing-only", action="store_true", help="measure step times, train nothing")
    p.add_argument("--timing-repeats", type=int, default=5)
    p.add_argument("--first-step-repeats", type=int, default=3,
                   help="fresh models per optimizer for the time to the first step (0: skip)")
    p.add_argument("--first-step-metrics", nargs="*", default=[],
                   help="metrics compiled with the first-step models (Keras creates their "
                        "variables in the first trace, which then runs twice)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _new_result(args, argv):
    """The result record's header (command, machine, date, LSTM weights) with no runs yet."""
    return {"command": "python benchmarks/fliplstm_mnist.py " + " ".join(argv or os.sys.argv[1:]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "tensorflow": tf.__version__, "kflip": kflip.__version__},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "lstm_weights": kflip.cell.load_weights(args.lstm_weights).metadata,
            "runs": []}


def _time_first_step(args, ds, result):
    """Time to the first train step (incl. compile) per optimizer, and its ratio to Bop, into ``result``."""
    rounds = first_step_times(args.optimizers, args.model, ds, args, args.first_step_repeats)
    first = {n: float(np.median(t)) for n, t in rounds.items()}
    result["first_step_s"], result["first_step_rounds_s"] = first, rounds
    print("first step incl. compile, median (s):", {n: round(v, 2) for n, v in first.items()}, flush=True)
    if "bop" in first:
        result["first_step_ratio_to_bop"] = {n: v / first["bop"] for n, v in first.items()}
        ratios = result["first_step_ratio_to_bop"]
        print("ratio of medians to Bop:", {n: round(v, 3) for n, v in ratios.items()})
        if len(rounds["bop"]) > 1:
            ci = {n: ratio_interval(rounds, n) for n in rounds if n != "bop"}
            result["first_step_ratio_ci"] = ci
            for n, c in ci.items():
                print(f"{n} / bop per round: {c['ratio']:.3f} [{c['low']:.3f}, {c['high']:.3f}] "
                      f"(geometric mean, 95% CI, {c['rounds']} rounds)", flush=True)


def _time_steps(args, ds, result):
    """Steady-state train-step wall and CPU time per optimizer, and their ratios to Bop, into ``result``."""
    t, c = step_times(args.optimizers, args.model, ds, args, repeats=args.timing_repeats)
    result["step_time_s"] = t
    result["step_cpu_s"] = c
    if "bop" in t:
        result["step_time_ratio_to_bop"] = {n: v / t["bop"] for n, v in t.items()}
        result["step_cpu_ratio_to_bop"] = {n: v / c["bop"] for n, v in c.items()}
    print("step time (ms):", {n: round(v * 1e3, 3) for n, v in t.items()}, flush=True)
    print("step CPU (ms): ", {n: round(v * 1e3, 3) for n, v in c.items()}, flush=True)
    if "bop" in t:
        print("ratio to Bop (wall):", {n: round(v, 3) for n, v in result["step_time_ratio_to_bop"].items()})
        print("ratio to Bop (CPU): ", {n: round(v, 3) for n, v in result["step_cpu_ratio_to_bop"].items()})


def _write(result, path):
    """Write ``result`` to ``path`` if one is given."""
    if path:
        write_json(path, result)


def _train_all(args, ds, result):
    """Train every optimizer for every seed, appending rows to ``result`` (rewritten after each run)."""
    for seed in args.seeds:
        for name in args.optimizers:
            row = train_one(name, args.model, ds, seed, args)
            result["runs"].append(row)
            print(f"{name:18s} seed {seed}: test acc {row['final_test_acc']:.4f} "
                  f"(per epoch {[round(a, 4) for a in row['test_acc']]}) "
                  f"wall {row['wall_s']:.0f}s", flush=True)
            _write(result, args.out)


def _summarize(args, result):
    """Mean and std of the final test accuracy per optimizer (empty without seeds); printed."""
    summary = {}
    for name in args.optimizers if args.seeds else []:
        accs = [r["final_test_acc"] for r in result["runs"] if r["optimizer"] == name]
        summary[name] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(accs)}
        print(f"{name:18s} {100 * np.mean(accs):.2f} +/- {100 * np.std(accs):.2f} % (n={len(accs)})")
    return summary


def main(argv=None):
    args = _parse_args(argv)
    ds = data.load(args.dataset, data_dir=args.data_dir)
    result = _new_result(args, argv)
    if not args.skip_timing:
        if args.first_step_repeats:
            _time_first_step(args, ds, result)
        _time_steps(args, ds, result)
    if args.timing_only:
        args.seeds = []
    _train_all(args, ds, result)
    result["summary"] = _summarize(args, result)
    _write(result, args.out)

if __name__ == "__main__":
    main()
