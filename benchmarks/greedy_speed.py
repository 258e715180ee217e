"""Greedy flip search speed: candidate evaluations per second, incremental vs naive.

Setting (kflip issue 4): the 2x512 BinaryNet MLP on MNIST, a 2,048-example probe set.
The model is first trained briefly with Bop (``--epochs``, default 1) so that the
binarized activations have realistic statistics. Then, side by side in one process:

* naive: one jit-compiled full forward pass of the probe set per candidate (the
  kernel is passed in as a tensor, no variable writes), ``--naive-candidates`` per layer;
* incremental: the engine's evaluation kernel on blocks of ``--block-size`` candidates
  in index order (``--inc-candidates`` per layer), compile excluded (one warm-up block);
* end to end: ``kflip.greedy_flip`` on each layer with ``--max-seconds`` per layer
  (includes compilation, acceptances and cache updates).

Usage:
  python benchmarks/greedy_speed.py --data-dir /work/shared/data [--json out.json]
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

from kflip import data, greedy, models  # noqa: E402
from kflip._files import write_json  # noqa: E402
from kflip.greedy import evaluators, incremental, network, probe, search  # noqa: E402


def bop():
    return lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, lq.optimizers.Bop(threshold=1e-6, gamma=1e-3)),
        default_optimizer=tf.keras.optimizers.legacy.Adam(0.01),
    )


def evaluate(s, cc, ff, mm, stats):
    """Evaluate a block; on pair-capacity overflow split it in halves (as the engine does)."""
    res = s.evaluate(cc, ff, mm)
    if res is not None:
        return res
    stats["overflow"] += 1
    h = len(cc) // 2
    a = evaluate(s, cc[:h], ff[:h], mm[:h], stats)
    b = evaluate(s, cc[h:], ff[h:], mm[h:], stats)
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])


def _first_layer_pass(model, xp, yp, name, args):
    """A whole pass over the first layer, incremental, against the naive search's rate on
    its first candidates: same weights, same probe, same (index) order, both end to end."""
    start = [v.numpy() for v in model.weights]
    common = dict(probe_size=None, layers=[name], order="index", time_budget=None, verbose=0)
    naive = greedy.greedy_flip(model, xp.numpy(), yp.numpy(), method="naive",
                               max_candidates=args.naive_pass_candidates, **common).layers[0]
    for v, w in zip(model.weights, start):
        v.assign(w)
    inc = greedy.greedy_flip(model, xp.numpy(), yp.numpy(), block_size=args.block_size, **common).layers[0]
    k = naive.tried
    row = dict(layer=name, candidates=inc.candidates, incremental_tried=inc.tried,
               incremental_accepted=inc.accepted, incremental_seconds=inc.seconds,
               incremental_evals_per_s=inc.tried / inc.seconds, naive_tried=k,
               naive_accepted=naive.accepted, naive_seconds=naive.seconds,
               naive_evals_per_s=k / naive.seconds,
               end_to_end_speedup=(inc.tried / inc.seconds) / (k / naive.seconds),
               same_first_flips=inc.flips[:naive.accepted] == naive.flips,
               loss_before=inc.loss_before, loss_after=inc.loss_after)
    print(json.dumps(row), flush=True)
    return row


def _parse_args(argv):
    """Parse the command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="/work/shared/data")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--probe-size", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--inc-candidates", type=int, default=32768)
    ap.add_argument("--naive-candidates", type=int, default=48)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", default=None,
                    help="load DIR/model.keras (e.g. from kflip train) instead of training with Bop")
    ap.add_argument("--first-layer-pass", action="store_true",
                    help="also time a whole first-layer pass end to end against the naive search")
    ap.add_argument("--naive-pass-candidates", type=int, default=256)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def _build_model(ds, args):
    """Load ``--model-dir`` or build the 2x512 MLP and train it briefly with Bop; snap it binary."""
    tf.keras.utils.set_random_seed(args.seed)
    if args.model_dir:
        model = tf.keras.models.load_model(os.path.join(args.model_dir, "model.keras"))
    else:
        model = models.mlp(ds.input_shape, ds.num_classes, hidden=(512, 512))
        model.compile(bop(), "sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=True)
        if args.epochs:
            model.fit(ds.x_train, ds.y_train, batch_size=64, epochs=args.epochs, verbose=2)
    kflip.snap_binary_weights(model)
    return model


def _flipped(w, cc, ff, j):
    """A copy of the kernel ``w`` with candidate ``j`` flipped."""
    w2 = w.copy()
    w2[ff[j, 0], cc[j]] *= -1
    return w2


def _naive_rate(nv, w, cc, ff, n):
    """Candidates per second of the naive evaluator (one full forward each), compile excluded."""
    nv.loss_of(tf.constant(w))  # compile
    t0 = time.perf_counter()
    for j in range(n):
        nv.loss_of(tf.constant(_flipped(w, cc, ff, j)))
    return n / (time.perf_counter() - t0)


def _start_seconds(s, Wm):
    """Compile and start the incremental evaluator; time a second start (caches, sign-flip table)."""
    s.start(Wm)  # compile and caches
    t0 = time.perf_counter()
    s.start(Wm)  # caches (and the sign-flip table), not in the per-candidate rate
    return time.perf_counter() - t0


def _incremental_rate(s, cc, ff, mm, ncand):
    """Candidates per second of the incremental kernel on blocks in index order, and its stats."""
    b = len(mm)
    stats = {"overflow": 0}
    for j in range(4):  # compile (block size and the pair capacities it needs)
        evaluate(s, cc[j * b:(j + 1) * b], ff[j * b:(j + 1) * b], mm, stats)
    stats = {"overflow": 0}
    t0 = time.perf_counter()
    done = 0
    while done < ncand:
        sl = slice(done, done + b)
        bc, bf = cc[sl], ff[sl]
        if len(bc) < b:
            bc = np.concatenate([bc, np.zeros(b - len(bc), np.int32)])
            bf = np.concatenate([bf, np.zeros((b - len(bf), 1), np.int32)])
        evaluate(s, bc, bf, mm, stats)
        done += b
    return done / (time.perf_counter() - t0), stats


def _max_loss_error(s, nv, w, cc, ff, mm, n_probe):
    """Exactness spot check: max |incremental - naive| mean loss change over the first 8 candidates."""
    b = len(mm)
    res = evaluate(s, cc[:b], ff[:b], mm, {"overflow": 0})
    base = nv.loss_of(tf.constant(w))
    errs = []
    for j in range(8):
        errs.append(abs((nv.loss_of(tf.constant(_flipped(w, cc, ff, j))) - base) - res[0][j]) / n_probe)
    return float(max(errs))


def _measure_layer(net, p, xp, yp, args):
    """Naive vs incremental evaluation rate (and exactness) of one binary layer; prints its row."""
    lin = net.ops[p]
    Wm = tf.reshape(tf.convert_to_tensor(lin.var), [lin.fan_in, lin.units])
    total = lin.fan_in * lin.units
    cc, ff = search.groups("index", lin.fan_in, lin.units, 1, None)
    # naive: full forward per candidate
    nv = evaluators.NaiveEvaluator(net, p, xp, yp)
    w = Wm.numpy()
    naive_rate = _naive_rate(nv, w, cc, ff, args.naive_candidates)
    # incremental evaluation kernel
    s = incremental.IncrementalEvaluator(net, p, xp, yp, pairs_per_block=65536)
    start_seconds = _start_seconds(s, Wm)
    mm = np.ones((args.block_size, 1), np.float32)
    inc_rate, stats = _incremental_rate(s, cc, ff, mm, min(args.inc_candidates, total))
    # exactness spot check: incremental vs naive loss for the first naive candidates
    max_err = _max_loss_error(s, nv, w, cc, ff, mm, len(yp))
    row = dict(
        layer=lin.name,
        kernel=list(lin.kernel_shape),
        naive_evals_per_s=naive_rate,
        incremental_evals_per_s=inc_rate,
        speedup=inc_rate / naive_rate,
        start_seconds=start_seconds,
        sign_table=bool(s.table),
        overflow_splits=int(stats["overflow"]),
        max_abs_mean_loss_error=max_err,
    )
    print(json.dumps(row), flush=True)
    return row


def _end_to_end(model, xp, yp, names, args):
    """``kflip.greedy_flip`` on each layer for ``--max-seconds``; prints and returns one row per layer."""
    e2e = []
    for name in names:
        rep = greedy.greedy_flip(
            model, xp.numpy(), yp.numpy(), probe_size=None, layers=[name],
            block_size=args.block_size, max_seconds=args.max_seconds, time_budget=None, verbose=0,
        )
        lr = rep.layers[0]
        e2e.append(dict(layer=name, tried=lr.tried, accepted=lr.accepted, seconds=lr.seconds,
                        evals_per_s=lr.tried / lr.seconds, loss_before=lr.loss_before,
                        loss_after=lr.loss_after))
        print(json.dumps(e2e[-1]), flush=True)
    return e2e


def _whole_model_rate(rows, key):
    """Whole-model candidates per second: total kernel size over the summed per-layer times."""
    return sum(r["kernel"][0] * r["kernel"][1] for r in rows) / sum(
        r["kernel"][0] * r["kernel"][1] / r[key] for r in rows)


def _summary(rows, e2e, first_pass, probe_size, args):
    """The summary record written to ``--json``."""
    tot_naive = _whole_model_rate(rows, "naive_evals_per_s")
    tot_inc = _whole_model_rate(rows, "incremental_evals_per_s")
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        probe_size=probe_size, block_size=args.block_size, epochs=args.epochs,
        whole_model_naive_evals_per_s=tot_naive, whole_model_incremental_evals_per_s=tot_inc,
        whole_model_speedup=tot_inc / tot_naive, layers=rows, end_to_end=e2e,
        first_layer_pass=first_pass,
    )


def main(argv=None):
    args = _parse_args(argv)
    ds = data.load("mnist", data_dir=args.data_dir)
    model = _build_model(ds, args)
    (xp, yp), _ = probe.probe_sets(ds.x_train, ds.y_train, args.probe_size, seed=0)
    net = network.Network(model)
    binary = [i for i in net.linear if net.ops[i].binary]
    rows = [_measure_layer(net, p, xp, yp, args) for p in binary]
    first_pass = _first_layer_pass(model, xp, yp, rows[0]["layer"], args) if args.first_layer_pass else None
    # end-to-end greedy search (compile, acceptances and cache updates included)
    e2e = _end_to_end(model, xp, yp, [r["layer"] for r in rows], args)
    summary = _summary(rows, e2e, first_pass, int(len(yp)), args)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("layers", "end_to_end")}))
    if args.json:
        write_json(args.json, summary)

if __name__ == "__main__":
    main()
