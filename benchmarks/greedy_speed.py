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


def main(argv=None):
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
    args = ap.parse_args(argv)

    ds = data.load("mnist", data_dir=args.data_dir)
    tf.keras.utils.set_random_seed(args.seed)
    if args.model_dir:
        model = tf.keras.models.load_model(os.path.join(args.model_dir, "model.keras"))
    else:
        model = models.mlp(ds.input_shape, ds.num_classes, hidden=(512, 512))
        model.compile(bop(), "sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=True)
        if args.epochs:
            model.fit(ds.x_train, ds.y_train, batch_size=64, epochs=args.epochs, verbose=2)
    kflip.snap_binary_weights(model)
    (xp, yp), _ = probe.probe_sets(ds.x_train, ds.y_train, args.probe_size, seed=0)
    net = network.Network(model)
    rows = []
    for p in [i for i in net.linear if net.ops[i].binary]:
        lin = net.ops[p]
        Wm = tf.reshape(tf.convert_to_tensor(lin.var), [lin.fan_in, lin.units])
        total = lin.fan_in * lin.units
        cc, ff = search.groups("index", lin.fan_in, lin.units, 1, None)
        # naive: full forward per candidate
        nv = evaluators.NaiveEvaluator(net, p, xp, yp)
        w = Wm.numpy()
        nv.loss_of(tf.constant(w))  # compile
        t0 = time.perf_counter()
        for j in range(args.naive_candidates):
            w2 = w.copy()
            w2[ff[j, 0], cc[j]] *= -1
            nv.loss_of(tf.constant(w2))
        naive_rate = args.naive_candidates / (time.perf_counter() - t0)
        # incremental evaluation kernel
        s = incremental.IncrementalEvaluator(net, p, xp, yp, pairs_per_block=65536)
        s.start(Wm)  # compile and caches
        t0 = time.perf_counter()
        s.start(Wm)  # caches (and the sign-flip table), not in the per-candidate rate
        start_seconds = time.perf_counter() - t0
        b = args.block_size
        ncand = min(args.inc_candidates, total)
        mm = np.ones((b, 1), np.float32)
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
        inc_rate = done / (time.perf_counter() - t0)
        # exactness spot check: incremental vs naive loss for the first naive candidates
        res = evaluate(s, cc[:b], ff[:b], mm, {"overflow": 0})
        base = nv.loss_of(tf.constant(w))
        errs = []
        for j in range(8):
            w2 = w.copy()
            w2[ff[j, 0], cc[j]] *= -1
            errs.append(abs((nv.loss_of(tf.constant(w2)) - base) - res[0][j]) / len(yp))
        row = dict(
            layer=lin.name,
            kernel=list(lin.kernel_shape),
            naive_evals_per_s=naive_rate,
            incremental_evals_per_s=inc_rate,
            speedup=inc_rate / naive_rate,
            start_seconds=start_seconds,
            sign_table=bool(s.table),
            overflow_splits=int(stats["overflow"]),
            max_abs_mean_loss_error=float(max(errs)),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    first_pass = _first_layer_pass(model, xp, yp, rows[0]["layer"], args) if args.first_layer_pass else None
    # end-to-end greedy search (compile, acceptances and cache updates included)
    e2e = []
    for name in [r["layer"] for r in rows]:
        rep = greedy.greedy_flip(
            model, xp.numpy(), yp.numpy(), probe_size=None, layers=[name],
            block_size=args.block_size, max_seconds=args.max_seconds, time_budget=None, verbose=0,
        )
        lr = rep.layers[0]
        e2e.append(dict(layer=name, tried=lr.tried, accepted=lr.accepted, seconds=lr.seconds,
                        evals_per_s=lr.tried / lr.seconds, loss_before=lr.loss_before,
                        loss_after=lr.loss_after))
        print(json.dumps(e2e[-1]), flush=True)
    tot_naive = sum(r["kernel"][0] * r["kernel"][1] for r in rows) / sum(
        r["kernel"][0] * r["kernel"][1] / r["naive_evals_per_s"] for r in rows)
    tot_inc = sum(r["kernel"][0] * r["kernel"][1] for r in rows) / sum(
        r["kernel"][0] * r["kernel"][1] / r["incremental_evals_per_s"] for r in rows)
    summary = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        probe_size=int(len(yp)), block_size=args.block_size, epochs=args.epochs,
        whole_model_naive_evals_per_s=tot_naive, whole_model_incremental_evals_per_s=tot_inc,
        whole_model_speedup=tot_inc / tot_naive, layers=rows, end_to_end=e2e,
        first_layer_pass=first_pass,
    )
    print(json.dumps({k: v for k, v in summary.items() if k not in ("layers", "end_to_end")}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
