"""The search driver: candidates in order, sequential acceptance, budgets, reports.

One driver for every evaluator (:mod:`kflip.greedy.evaluators`). A block of candidates
is evaluated against the current kernel; the first improving candidate is accepted
and evaluation restarts after it, except for candidates the evaluator proves
unaffected (``exact_zero``), so the accepted sequence is the one-at-a-time search's.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.greedy.ops import Linear  # noqa: E402
from kflip.greedy.report import LayerReport  # noqa: E402


def groups(order, fan_in, units, group_size, rng, gain=None):
    """Candidate groups in search order: columns (M,), fan-in rows (M, G) (-1 padded)."""
    g = group_size
    if order == "random":
        rows = np.stack([rng.permutation(fan_in) for _ in range(units)], 1)  # (F, C)
    elif order == "gradient":
        rows = np.argsort(gain, axis=0, kind="stable")  # most promising first per column
    else:
        rows = np.broadcast_to(np.arange(fan_in)[:, None], (fan_in, units))
    nchunk = -(-fan_in // g)
    pad = nchunk * g - fan_in
    rows = np.concatenate([rows, np.full((pad, units), -1, rows.dtype)], 0)
    ff = rows.reshape(nchunk, g, units).transpose(0, 2, 1).reshape(-1, g)  # (chunk, col)
    cc = np.tile(np.arange(units), nchunk)
    if order == "random":
        perm = rng.permutation(len(cc))
        cc, ff = cc[perm], ff[perm]
    elif order == "gradient":
        gg = np.where(ff >= 0, gain[np.maximum(ff, 0), cc[:, None]], 0.0).sum(1)
        perm = np.argsort(gg, kind="stable")
        cc, ff = cc[perm], ff[perm]
    return cc.astype(np.int32), ff.astype(np.int32)


def masks(n_bits, start, count):
    """Rows ``start .. start+count-1`` of the 2**n_bits assignments as float masks."""
    m = np.arange(start, start + count, dtype=np.int64)[:, None]
    return ((m >> np.arange(n_bits)) & 1).astype(np.float32)


@dataclasses.dataclass
class _Candidates:
    cc: np.ndarray  # (M,) output channels
    ff: np.ndarray  # (M, G) fan-in rows (padding: row 0 with mask 0)
    mask: np.ndarray  # (M, G) 1.0 where the row is real

    @classmethod
    def of(cls, ev, options, rng):
        lin = ev.lin
        gain = None
        if options.order == "gradient":
            gain = -2.0 * ev.Wm.numpy() * ev.gradient().numpy()  # first-order loss change
        cc, ff = groups(options.order, lin.fan_in, lin.units, options.group_size, rng, gain)
        return cls(cc, np.maximum(ff, 0), (ff >= 0).astype(np.float32))

    def block(self, pos, b, limit):
        """Candidates pos.. (at most b, up to limit), padded to b with no-op candidates."""
        sl = slice(pos, min(pos + b, limit))
        cc, ff, mm = self.cc[sl], self.ff[sl], self.mask[sl]
        pad = b - len(cc)
        if pad:
            cc = np.concatenate([cc, np.zeros(pad, np.int32)])
            ff = np.concatenate([ff, np.zeros((pad, ff.shape[1]), np.int32)])
            mm = np.concatenate([mm, np.zeros((pad, mm.shape[1]), np.float32)])
        return cc, ff, mm, b - pad


class _LayerRun:
    """Bookkeeping of one layer search: counts, accepted flips, the model write, budget."""

    def __init__(self, ev, options, deadline, progress):
        self.ev, self.lin, self.options = ev, ev.lin, options
        self.deadline, self.progress = deadline, progress
        self.tried = self.accepted = self.flipped = self.done = 0
        self.flips: list = []
        self.committed = ev.Wm

    def out_of_time(self):
        return self.deadline is not None and time.perf_counter() > self.deadline

    def mean_loss(self):
        return self.ev.loss_sum() / self.ev.n

    def accept(self, c, f, m):
        Wm = self.ev.accept(int(c), f, m)
        self.write(Wm)
        self.accepted += 1
        sel = [int(fi) * self.lin.units + int(c) for fi, mi in zip(f, m) if mi > 0]
        self.flipped += len(sel)
        self.flips.extend(sel)
        self.event("accept")

    def write(self, Wm):
        self.committed = Wm
        self.lin.var.assign(tf.reshape(Wm, self.lin.kernel_shape))

    def restore(self):
        self.lin.var.assign(tf.reshape(self.committed, self.lin.kernel_shape))

    def event(self, kind):
        if kind == "block" and self.progress is not None:
            self.progress.update(self.done, self.accepted, self.mean_loss())
        if self.options.on_step is not None:
            self.options.on_step({"event": kind, "layer": self.lin.name, "tried": self.tried,
                                  "accepted": self.accepted, "loss": self.mean_loss()})


def _exhaustive(run: _LayerRun, cand: _Candidates, limit, thr):
    """Every assignment of each group; keep the best one if it beats ``thr``."""
    g = run.options.group_size
    total, bmax = 1 << g, min(run.options.block_size, run.ev.max_block or run.options.block_size)
    for j in range(limit):
        if run.out_of_time():
            return "max_seconds"
        best, best_code, start, b = 0.0, 0, 0, min(bmax, total)
        while start < total:
            cnt = min(b, total - start)
            mm = np.zeros((b, g), np.float32)
            mm[:cnt] = masks(g, start, cnt) * cand.mask[j][None]
            res = run.ev.evaluate(np.full(b, cand.cc[j], np.int32), np.repeat(cand.ff[j][None], b, 0), mm)
            if res is None:
                b = max(1, b // 2)
                continue
            k = int(np.argmin(res[0][:cnt]))
            if res[0][k] < best:
                best, best_code = float(res[0][k]), start + k
            start += cnt
        run.tried += total - 1
        run.done += 1
        run.event("block")
        if best < thr:
            run.accept(cand.cc[j], cand.ff[j], masks(g, best_code, 1)[0] * cand.mask[j])
    return "done"


def _take(run: _LayerRun, bc, delta, naff, cnt, thr, block):
    """Walk a block's results: accept the first improvement; how many were decided."""
    t, touched = 0, None
    while t < cnt:
        if touched is None:
            run.tried += 1
            if delta[t] < thr:
                run.accept(bc[t], block[1][t], block[2][t])
                touched = {int(bc[t])}
            t += 1
        elif run.ev.exact_zero and int(bc[t]) not in touched and naff[t] == 0:
            run.tried += 1  # exactly zero change in the current state too
            t += 1
        else:
            break
    return t, touched is not None


def _sequential(run: _LayerRun, cand: _Candidates, limit, thr):
    """Candidates in order; block sizes adapt to how soon the next acceptance comes."""
    bmax = max(1, min(run.options.block_size, run.ev.max_block or run.options.block_size))
    ladder = sorted({min(8, bmax), bmax} | ({64} if bmax >= 256 else set()))  # compiled sizes
    pos, b = 0, ladder[min(1, len(ladder) - 1)]
    while pos < limit:
        if run.out_of_time():
            return "max_seconds"
        block = cand.block(pos, b, limit)
        res = run.ev.evaluate(*block[:3])
        if res is None:
            b = max([v for v in ladder if v < b] or [max(1, b // 2)])
            ladder = sorted(set(ladder) | {b})
            continue
        t, accepted = _take(run, block[0], res[0], res[1], block[3], thr, block)
        pos += t
        run.done = pos
        run.event("block")
        if not accepted:  # grow the block
            b = next((v for v in ladder if v > b), b)
        else:  # the next acceptance tends to come soon: the next block need not be large
            b = next((v for v in ladder if v >= 2 * t), ladder[-1])
    return "done"


def search_layer(ev, pass_index, options, rng, deadline=None, progress=None) -> LayerReport:
    """One pass over the candidates of ``ev``'s layer; the model kernel is updated on every
    acceptance and restored to the last accepted state on any exception."""
    lin: Linear = ev.lin
    t0 = time.perf_counter()
    ev.start(tf.reshape(tf.convert_to_tensor(lin.var), [lin.fan_in, lin.units]))
    cand = _Candidates.of(ev, options, rng)
    m_all = len(cand.cc)
    limit = m_all if options.max_candidates is None else min(m_all, options.max_candidates)
    loss_before = ev.loss_sum() / ev.n
    run = _LayerRun(ev, options, deadline, progress and progress.layer(lin.name, limit))
    thr = -options.min_delta * ev.n  # accept iff the loss-sum change is below this
    try:
        stop = (_exhaustive if options.exhaustive else _sequential)(run, cand, limit, thr)
    except BaseException:
        run.restore()
        raise
    if stop == "done" and limit < m_all:
        stop = "max_candidates"
    if run.progress is not None:
        run.progress.update(run.done, run.accepted, run.mean_loss(), finalize=True)
    return LayerReport(
        name=lin.name, pass_index=pass_index, candidates=m_all, tried=run.tried,
        accepted=run.accepted, flipped=run.flipped, loss_before=loss_before,
        loss_after=run.mean_loss(), seconds=time.perf_counter() - t0, stop_reason=stop,
        flips=run.flips,
    )
