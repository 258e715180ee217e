"""The incremental evaluator: exact loss changes of candidate flips from cached activations.

For a layer whose successors form a chain (every op after it reads only the op before
it), see :mod:`kflip.greedy` for the method: the prefix runs once; a flip of ``W[f, c]``
changes only channel ``c``; examples whose binarized boundary does not change keep their
loss; the others get a rank-1 / local update of the next layer's pre-activation and the
rest of the network runs on those rows only.

When the boundary is binary (a sign quantizer, values +-1) and the next layer is Dense,
a changed boundary value is always its negation, so the loss change of example ``n``
when channel ``c`` changes does not depend on which weight of the column was flipped:
it is tabulated once per layer (``Dt[c, n]``, the pair path's arithmetic) and only the
rows of examples an accepted flip changed are recomputed. A block then costs one fused
pass over its (candidate, example) pairs: the new channel values, the comparison with
the boundary, a masked float64 sum of the table.
"""

from __future__ import annotations

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.greedy.ops import (  # noqa: E402
    BatchNorm, Bias, Flatten, GlobalPool, Linear, Pool, new_channels, sum64, to_back, to_front)
from kflip.greedy.network import GRADIENT_EXAMPLES, Network  # noqa: E402


class IncrementalEvaluator:
    """Cached state and compiled kernels for searching the kernel of ops[p] (an
    :class:`~kflip.greedy.evaluators.Evaluator`)."""

    exact_zero = True  # naff == 0: the loss is unchanged whatever other channels do

    max_block = None  # any block size

    def __init__(self, net: Network, p: int, x, y, pairs_per_block: int = 65536):
        if not self.applies(net, p):
            raise ValueError(f"`model`: the ops after {net.ops[p].name!r} do not form a chain.")
        self.net, self.p = net, p
        self.lin: Linear = net.ops[p]
        self.x, self.y = x, y
        self.n = int(x.shape[0])
        ops = net.ops
        q = next((i for i in net.linear if i > p), None)
        self.q = q
        end = len(ops) if q is None else q
        chain, post_flatten, flat = [], False, False
        for op in ops[p + 1 : end]:
            if isinstance(op, Flatten):
                flat = True
                continue
            if flat and isinstance(op, (BatchNorm, Bias, Pool, GlobalPool)):
                post_flatten = True
            chain.append(op)
        self.chain, self.flat = chain, flat
        self.next: Linear | None = ops[q] if q is not None else None
        self.rest_start = None if q is None else q + 1
        self._post_flatten = post_flatten
        self.pairs_per_block = int(pairs_per_block)
        self._eval_fns = {}
        self._cap = {}
        self._update = net.jit(self._update_impl)
        self._init = net.jit(self._init_impl)
        self._grad = net.jit(self._grad_impl)
        self._update_t = net.jit(lambda Z, A: (to_front(Z), to_front(A)))
        self._update_table = net.jit(self._update_table_impl)
        self._rows_fns = {}
        self._table_fns = {}
        self.table = False
        self.params = None

    @staticmethod
    def applies(net: Network, p: int) -> bool:
        """Whether the layer's successors form a chain (no shortcut crosses it)."""
        return net.chain_after(p)

    # ---- helpers -----------------------------------------------------------------
    def _P(self, X):
        if self.lin.kind == "dense":
            return X
        return self.lin.patches(X)

    def _chain_chan(self, zc, idx):
        for op in self.chain:
            zc = op.chan(zc, idx)
        return zc

    def _contrib(self, d, idx):
        """Next layer's pre-activation change for boundary deltas d (K, *spb) in channels idx."""
        nxt = self.next
        k = nxt.kernel()
        rb = d.shape.rank - 1  # boundary spatial rank
        if nxt.kind == "dense":
            if rb == 0:
                return d[:, None] * tf.gather(k, idx)
            sp = [int(s) for s in d.shape[1:]]
            k4 = tf.reshape(k, sp + [-1, nxt.units])
            g = tf.gather(k4, idx, axis=rb)  # (*sp, K, U)
            return tf.einsum("khw,hwku->ku", d, g) if rb == 2 else tf.einsum("kh,hku->ku", d, g)
        g = tf.gather(k, idx, axis=2)  # (kh, kw, K, U)
        kh, kw = nxt.ksize
        g = tf.reshape(tf.transpose(g, [2, 0, 1, 3]), [-1, kh * kw, nxt.units])
        pt = nxt.patches(d[..., None], pad_value=0.0)  # (K, H', W', kh*kw)
        return tf.einsum("khwp,kpu->khwu", pt, g)

    def _rest_loss(self, znext):
        return self.net.chain(znext, self.rest_start)

    # ---- kernels -----------------------------------------------------------------
    def _init_impl(self, x, Wm):
        X = self.net.prefix(x, self.p)[self.net.src[self.p][0]]  # incl. the input quantizer
        P = self._P(X)
        Z = tf.tensordot(P, Wm, [[P.shape.rank - 1], [0]])
        c = int(Wm.shape[1])
        A = to_back(self._chain_chan(to_front(Z), tf.range(c)))
        if self.next is None:
            logits, Zn = A, tf.zeros([0])
        else:
            Zn = self.next.full(tf.reshape(A, [self.n, -1]) if self.flat else A)
            logits = self._rest_loss(Zn)
        L = self.net.per_example_loss(logits, self.y)
        return X, P, Z, A, Zn, L

    def _grad_impl(self, X, Wm):
        with tf.GradientTape() as tape:
            tape.watch(Wm)
            logits = self.net.run({self.net.src[self.p][0]: X}, self.p, override=(self.p, Wm))
            loss = tf.reduce_mean(self.net.per_example_loss(logits, self.y[:GRADIENT_EXAMPLES]))
        return tape.gradient(loss, Wm)

    def _eval_impl(self, P, Z, A, Zn, L, Wm, cc, ff, mm, capacity):
        zc = new_channels(P, Z, Wm, cc, ff, mm)
        ac_new = self._chain_chan(zc, cc)  # (B, N, *spb)
        a_t = to_front(A)  # (C, N, *spb)
        ac_old = tf.gather(a_t, cc)
        sp_axes = list(range(2, ac_new.shape.rank))
        diff = tf.not_equal(ac_new, ac_old)
        changed = tf.reduce_any(diff, axis=sp_axes) if sp_axes else diff  # (B, N)
        naff = tf.reduce_sum(tf.cast(changed, tf.int32), axis=1)
        b = int(cc.shape[0])
        L64 = tf.cast(L, tf.float64)
        if self.next is None:
            C = int(A.shape[-1])
            if self.net.loss_fn is None and self.net.from_logits:
                # closed form: one logit column changes; lse' = logaddexp(lse without c, l')
                eye = tf.eye(C, dtype=tf.bool)
                masked = tf.where(eye[None], tf.constant(-np.inf, A.dtype), A[:, None, :])
                lse_wo = tf.gather(tf.reduce_logsumexp(masked, axis=-1), cc, axis=1)  # (N, B)
                lse_wo = tf.transpose(lse_wo)  # (B, N)
                hi = tf.maximum(lse_wo, ac_new)
                lse = hi + tf.math.log1p(tf.exp(-tf.abs(lse_wo - ac_new)))
                ly = tf.gather(A, self.y, axis=1, batch_dims=1)  # (N,)
                is_y = tf.equal(tf.cast(self.y, tf.int32)[None], cc[:, None])
                lnew = lse - tf.where(is_y, ac_new, ly[None])
            else:
                onehot = tf.one_hot(cc, C, on_value=True, off_value=False)[:, None, :]
                logits = tf.where(onehot, ac_new[..., None], A[None])  # (B, N, C)
                lnew = self.net.per_example_loss(logits, tf.broadcast_to(self.y[None], [b, self.n]))
            delta = tf.where(changed, tf.cast(lnew, tf.float64) - L64[None], tf.zeros_like(L64[None]))
            return tf.reduce_sum(delta, axis=1), naff, tf.constant(0, tf.int32)
        flat = tf.reshape(changed, [-1])
        pos = tf.cumsum(tf.cast(flat, tf.int32)) - 1
        count = tf.reduce_sum(tf.cast(flat, tf.int32))
        slot = tf.where(flat & (pos < capacity), pos, capacity)
        ids = tf.tensor_scatter_nd_update(
            tf.fill([capacity + 1], -1), slot[:, None], tf.range(b * self.n)
        )[:capacity]
        valid = ids >= 0
        ids = tf.maximum(ids, 0)
        bk, nk = ids // self.n, ids % self.n
        ck = tf.gather(cc, bk)
        spb = ac_new.shape[2:]
        new_rows = tf.gather(tf.reshape(ac_new, [-1] + list(spb)), ids)
        old_rows = tf.gather_nd(a_t, tf.stack([ck, nk], -1))
        zrows = tf.gather(Zn, nk) + self._contrib(new_rows - old_rows, ck)
        lnew = self.net.per_example_loss(self._rest_loss(zrows), tf.gather(self.y, nk))
        dk = tf.where(valid, tf.cast(lnew, tf.float64) - tf.gather(L64, nk), tf.zeros_like(bk, tf.float64))
        delta = tf.math.unsorted_segment_sum(dk, bk, b)
        return delta, naff, count

    def _eval_table_impl(self, Pt, Zt, At, Dt, Wm, cc, ff, mm):
        """Table path of :meth:`_eval_impl` (transposed caches: ``Pt`` (F, N), ``Zt``,
        ``At`` (C, N)); ``ok`` is False if some changed value is not the old one negated
        (then the table does not apply and the caller uses the pair path)."""
        b, g = int(ff.shape[0]), int(ff.shape[1])
        w = tf.gather_nd(Wm, tf.stack([ff, tf.broadcast_to(cc[:, None], [b, g])], -1))
        coef = tf.reshape(-2.0 * w * mm, [b, g, 1])
        pg = tf.reshape(tf.gather(Pt, tf.reshape(ff, [-1])), [b, g, self.n])
        zc = tf.gather(Zt, cc) + tf.reduce_sum(coef * pg, axis=1)  # as new_channels
        ac_new = self._chain_chan(zc, cc)  # (B, N)
        ac_old = tf.gather(At, cc)
        changed = tf.not_equal(ac_new, ac_old)
        ok = tf.reduce_all(tf.logical_or(tf.logical_not(changed), tf.equal(ac_new, -ac_old)))
        naff = tf.reduce_sum(tf.cast(changed, tf.int32), axis=1)
        delta = tf.reduce_sum(tf.where(changed, tf.gather(Dt, cc), tf.zeros([], tf.float64)), axis=1)
        return delta, naff, ok

    def _table_rows_impl(self, A, Zn, L, Dt, ids):
        """``Dt`` with the columns of examples ``ids`` (K,) recomputed: ``Dt[c, n]`` is the
        loss change of example n if its boundary value in channel c is negated, computed
        as the pair path computes a changed pair (new - old = -a - a)."""
        a = tf.gather(A, ids)  # (K, C)
        k, c = int(a.shape[0]), int(a.shape[1])
        zrows = tf.gather(Zn, ids)[:, None, :] + (-a - a)[:, :, None] * self.next.kernel()[None]
        nk = tf.repeat(ids, c)
        lnew = self.net.per_example_loss(self._rest_loss(tf.reshape(zrows, [k * c, -1])),
                                         tf.gather(self.y, nk))
        dk = tf.cast(lnew, tf.float64) - tf.gather(tf.cast(L, tf.float64), nk)
        return tf.tensor_scatter_nd_update(Dt, tf.stack([tf.tile(tf.range(c), [k]), nk], -1), dk)

    def _update_table_impl(self, P, Z, A, Zn, L, Wm, Zt, At, c, ff, mm):
        """:meth:`_update_impl` and the transposed caches' row ``c``; ``rows`` (N,) marks
        the examples whose table column is stale (boundary, next pre-activation or loss
        changed)."""
        Wm, Z2, A2, Zn2, L2 = self._update_impl(P, Z, A, Zn, Wm, c, ff, mm)
        sel = tf.equal(tf.range(int(At.shape[0])), c)[:, None]
        Zt = tf.where(sel, tf.gather(Z2, c, axis=1)[None], Zt)
        At = tf.where(sel, tf.gather(A2, c, axis=1)[None], At)
        rows = (tf.not_equal(tf.gather(A, c, axis=1), tf.gather(A2, c, axis=1))
                | tf.reduce_any(tf.not_equal(Zn, Zn2), axis=1) | tf.not_equal(L, L2))
        return (Wm, Z2, A2, Zn2, L2), Zt, At, rows

    def _update_impl(self, P, Z, A, Zn, Wm, c, ff, mm):
        g = int(ff.shape[0])
        idx = tf.stack([ff, tf.fill([g], c)], -1)
        old = tf.gather_nd(Wm, idx)
        Wm = tf.tensor_scatter_nd_update(Wm, idx, tf.where(mm > 0, -old, old))
        zc = tf.tensordot(P, tf.gather(Wm, c, axis=1), [[P.shape.rank - 1], [0]])  # (N, *sp)
        C = int(Wm.shape[1])
        sel = tf.equal(tf.range(C), c)
        Z = tf.where(sel, zc[..., None], Z)
        ac = self._chain_chan(zc[None], c[None])[0]
        a_old = tf.gather(A, c, axis=-1)
        A = tf.where(sel, ac[..., None], A)
        if self.next is None:
            logits = A
        else:
            Zn = Zn + self._contrib(ac - a_old, tf.fill([self.n], c))
            logits = self._rest_loss(Zn)
        L = self.net.per_example_loss(logits, self.y)
        return Wm, Z, A, Zn, L

    # ---- driver-facing API -------------------------------------------------------
    def start(self, Wm):
        """Compute the caches for the current kernel (flat (F, C) tensor)."""
        # the model's variables, read now (outside XLA); the searched kernel itself is
        # never read from them (it is ``Wm``), so they stay valid for the whole layer
        self.params = self.net.values()
        self.X, self.P, self.Z, self.A, self.Zn, self.L = self._init(self.x, Wm, params=self.params)
        if self.A.shape.rank > 2 and (self._post_flatten or (
                self.next is not None and self.next.kind == "dense" and not self.flat)):
            raise ValueError(
                f"`model`: between {self.lin.name!r} and the next Dense only a Flatten and "
                "elementwise layers are supported after the spatial layers."
            )
        self.Wm = Wm
        self._start_table()

    # ---- sign-flip table ---------------------------------------------------------
    def _start_table(self):
        """Build the table if it can apply: a rank-2 boundary, now all +-1, and a Dense next."""
        self.table = (self.next is not None and self.next.kind == "dense"
                      and self.A.shape.rank == 2 and bool(tf.reduce_all(tf.abs(self.A) == 1.0)))
        if not self.table:
            return
        self.Pt = tf.transpose(self.P)
        self.Zt, self.At = self._update_t(self.Z, self.A, params=self.params)
        self.Dt = tf.zeros([int(self.A.shape[1]), self.n], tf.float64)
        self._refresh_rows(np.arange(self.n, dtype=np.int32))

    def _row_chunk(self):
        """Examples per table-row call: (K * C, width) rows stay under 2**24 elements."""
        width = max(self.net.ops[i].units for i in self.net.linear if i >= self.q)
        return max(1, min(self.n, 2**24 // (int(self.A.shape[1]) * width)))

    def _refresh_rows(self, ids):
        """Recompute the table columns of examples ``ids`` (host int32 array), in calls of
        a few compiled sizes (8, 32 or the chunk), padded by repeating the last id."""
        big = self._row_chunk()
        sizes = sorted({min(big, 8), min(big, 32), big})
        i = 0
        while i < len(ids):
            k = next(v for v in sizes if v >= min(len(ids) - i, big))
            if k not in self._rows_fns:
                self._rows_fns[k] = self.net.jit(self._table_rows_impl)
            chunk = ids[i:i + k]
            chunk = np.concatenate([chunk, np.full(k - len(chunk), chunk[-1], np.int32)])
            self.Dt = self._rows_fns[k](self.A, self.Zn, self.L, self.Dt, chunk, params=self.params)
            i += k

    def _evaluate_table(self, cc, ff, mm):
        """The table path of :meth:`evaluate`; None if it does not apply (then never again)."""
        key = (int(cc.shape[0]), int(ff.shape[1]))
        if key not in self._table_fns:
            self._table_fns[key] = self.net.jit(self._eval_table_impl)
        delta, naff, ok = self._table_fns[key](self.Pt, self.Zt, self.At, self.Dt, self.Wm, cc, ff, mm,
                                               params=self.params)
        if not bool(ok):
            self.table = False
            return None
        return delta.numpy(), naff.numpy()

    def gradient(self):
        return self._grad(self.X[:GRADIENT_EXAMPLES], self.Wm, params=self.params)

    def loss_sum(self):
        return float(sum64(self.L))

    def _capacities(self, b):
        """Compiled pair capacities for block size b: n * 4**k, up to the cap."""
        top = min(b * self.n, max(self.n, self.pairs_per_block))
        if top <= 8192:  # small problems: one compiled size
            return [top]
        caps, c = [], self.n
        while c < top:
            caps.append(c)
            c *= 4
        return caps + [top]

    def eval_fn(self, b, g, capacity):
        key = (b, g, capacity)
        if key not in self._eval_fns:
            self._eval_fns[key] = self.net.jit(
                lambda P, Z, A, Zn, L, Wm, cc, ff, mm: self._eval_impl(
                    P, Z, A, Zn, L, Wm, cc, ff, mm, capacity
                )
            )
        return self._eval_fns[key]

    def evaluate(self, cc, ff, mm):
        """Loss-sum deltas (float64) and changed-example counts for a block.

        Returns None if more (candidate, example) pairs change than ``pairs_per_block``
        allows (the caller splits the block). The pair capacity adapts to the counts
        seen (compiled sizes n * 4**k).
        """
        if self.table:
            res = self._evaluate_table(cc, ff, mm)
            if res is not None:
                return res
        b, g = int(cc.shape[0]), int(ff.shape[1])
        caps = self._capacities(b) if self.next is not None else [0]
        cap = self._cap.get(b, caps[-1]) if self.next is not None else 0
        while True:
            fn = self.eval_fn(b, g, cap)
            delta, naff, count = fn(self.P, self.Z, self.A, self.Zn, self.L, self.Wm, cc, ff, mm,
                                    params=self.params)
            if self.next is None:
                return delta.numpy(), naff.numpy()
            count = int(count)
            if count > cap:
                bigger = [c for c in caps if c >= count]
                if not bigger:
                    self._cap[b] = caps[-1]
                    return None
                cap = bigger[0]
                continue
            # next time: the smallest capacity with 2x headroom over this block's count
            self._cap[b] = next((c for c in caps if c >= 2 * count), caps[-1])
            return delta.numpy(), naff.numpy()

    def apply(self, c, ff, mm):
        """New state tensors after flipping (c, ff[mm>0]); does not commit them."""
        return self._update(self.P, self.Z, self.A, self.Zn, self.Wm, c, ff, mm, params=self.params)

    def commit(self, state):
        self.Wm, self.Z, self.A, self.Zn, self.L = state
        if self.table:  # a state from elsewhere: rebuild the table
            self._start_table()

    def accept(self, c, ff, mm):
        """Flip (c, ff[mm > 0]) in the cached state; returns the new flat kernel."""
        c, ff, mm = tf.constant(c, tf.int32), tf.constant(ff), tf.constant(mm)
        if not self.table:
            self.commit(self.apply(c, ff, mm))
            return self.Wm
        state, self.Zt, self.At, rows = self._update_table(
            self.P, self.Z, self.A, self.Zn, self.L, self.Wm, self.Zt, self.At, c, ff, mm,
            params=self.params)
        self.Wm, self.Z, self.A, self.Zn, self.L = state
        rows = np.flatnonzero(rows.numpy()).astype(np.int32)
        if rows.size:
            self._refresh_rows(rows)
        return self.Wm
