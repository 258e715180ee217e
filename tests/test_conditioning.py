"""Per-tensor conditioning of the flip rule (kflip.conditioning): exactness when off,
XLA, finiteness on bad gradients, its effect, the Keras optimizer, files, meta-training."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import kflip
from conftest import random_lstm_weights, small_mlp
from kflip import cell as cell_lib
from kflip import conditioning, weights_io
from kflip.meta import MetaConfig, tasks, unroll
from kflip.meta import config as meta_config
from kflip.rule import FlipRule


def conditioned(w=None, seed=0, scale=1.0):
    w = w or random_lstm_weights(hidden=2, seed=seed)
    rng = np.random.RandomState(seed + 100)
    tk = rng.randn(len(conditioning.TENSOR_FEATURES), conditioning.num_outputs(w.hidden_size))
    return dataclasses.replace(w, tensor_kernel=scale * tk)


def params_and_grads(seed=0):
    rng = np.random.RandomState(seed)
    shapes = [(3, 3, 4, 8), (72, 10)]
    params = [tf.constant(np.where(rng.rand(*s) < 0.5, -1.0, 1.0), tf.float32) for s in shapes]
    grads = [tf.constant(rng.randn(*s) * 1e-3, tf.float32) for s in shapes]
    return params, grads


def run(rule, params, grads_seq, compiled):
    step = tf.function(rule.update, jit_compile=True) if compiled else rule.update
    state, flips = rule.init(params), []
    for grads in grads_seq:
        signs, state = step(grads, state, params)
        params = [p * s for p, s in zip(params, signs)]
        flips.append([p.numpy() for p in params])
    return params, state, flips


def test_zero_tensor_kernel_is_the_unconditioned_rule():
    w = random_lstm_weights(hidden=2)
    assert not w.conditioned and w.tensor_kernel.shape == (4, 9)
    assert not dataclasses.replace(w, tensor_kernel=np.zeros((4, 9))).conditioned
    assert FlipRule.from_weights(w).init(tf.ones([3])).tensor == ()


def test_conditioned_rule_compiles_and_equals_eager():
    rule = FlipRule.from_weights(conditioned())
    params, _ = params_and_grads()
    grads_seq = [params_and_grads(seed)[1] for seed in range(1, 6)]
    _, s_eager, f_eager = run(rule, params, grads_seq, compiled=False)
    _, s_xla, f_xla = run(rule, params, grads_seq, compiled=True)
    assert sum(int(f) for f in s_eager.flips) > 0
    for a, b in zip(f_eager, f_xla):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    for a, b in zip(s_eager.tensor, s_xla.tensor):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e19])
def test_features_stay_finite_on_bad_gradients(bad):
    rule = FlipRule.from_weights(conditioned())
    params, grads = params_and_grads()
    spoiled = [tf.tensor_scatter_nd_update(g, [[0] * g.shape.rank], [bad]) for g in grads]
    seq = [grads, spoiled, [g * bad if np.isfinite(bad) else g + bad for g in grads], grads]
    params, state, _ = run(rule, params, seq, compiled=True)
    for p in params:
        assert set(np.unique(p.numpy())) <= {-1.0, 1.0}
    for t in state.tensor:
        assert np.all(np.isfinite(np.array(t))), t
    # and the rule still works afterwards
    phi, _ = conditioning.features(params[0], state.tensor[0], tf.constant(1e-6), tf.constant(5.0), 1e-20)
    assert np.all(np.isfinite(phi.numpy())) and np.all(np.abs(phi.numpy()) <= 3)


def test_a_bad_gradient_leaves_the_tensor_state_as_it_was():
    rule = FlipRule.from_weights(conditioned())
    params, grads = params_and_grads()
    _, state, _ = run(rule, params, [grads, grads], compiled=False)
    spoiled = [tf.tensor_scatter_nd_update(g, [[0] * g.shape.rank], [np.nan]) for g in grads]
    signs, after = rule.update(spoiled, state, params)
    for s in signs:
        assert np.all(s.numpy() == 1)
    for old, new in zip(state.tensor + (state.h, state.c, state.v), after.tensor + (after.h, after.c, after.v)):
        for a, b in zip(tf.nest.flatten(old), tf.nest.flatten(new)):
            np.testing.assert_array_equal(np.array(a), np.array(b))


def test_the_step_feature_moves_the_threshold():
    # Bop's cell with a threshold that grows with log(step): flips early, none later
    bop = kflip.bop_weights(threshold=1e-6, gamma=1e-1)
    tk = conditioning.zeros(1)
    tk[conditioning.TENSOR_FEATURES.index("log_step"), -1] = 20.0  # e**5 at step 10
    counts = {}
    for name, w in (("plain", bop), ("step", dataclasses.replace(bop, tensor_kernel=tk))):
        rule = FlipRule.from_weights(w)
        update = tf.function(rule.update, jit_compile=True)
        params, grads = params_and_grads()
        state, counts[name] = rule.init(params), []
        for _ in range(30):  # a gradient that always says "flip me"
            g = [tf.abs(x) * p * 1e-1 for x, p in zip(grads, params)]
            signs, state = update(g, state, params)
            params = [p * s for p, s in zip(params, signs)]
            counts[name].append(sum(int(np.sum(s.numpy() < 0)) for s in signs))
    assert counts["step"][0] == counts["plain"][0] > 0  # log(1) = 0: Bop's threshold
    assert sum(counts["plain"][10:]) > 0
    assert sum(counts["step"][10:]) == 0


def test_flip_rate_feature_tracks_flips():
    rule = FlipRule.from_weights(conditioned(scale=0.1))
    params, grads = params_and_grads()
    _, state, flips = run(rule, params, [grads] * 3, compiled=False)
    assert all(0.0 <= float(t.rate) <= 1.0 for t in state.tensor)
    assert any(float(t.rate) > 0 for t in state.tensor)


def test_keras_optimizer_with_conditioned_weights(digits, tmp_path):
    w = conditioned(kflip.bop_weights(), scale=0.5)
    path = str(tmp_path / "cond.npz")
    w.save(path)
    import json

    assert json.load(open(str(tmp_path / "cond.json")))["format"] == weights_io.FORMAT_CONDITIONED
    loaded = kflip.LSTMWeights.load(path)
    np.testing.assert_array_equal(loaded.tensor_kernel, w.tensor_kernel)
    model = small_mlp()
    opt = kflip.FlipLSTM(path)
    model.compile(opt, "sparse_categorical_crossentropy", jit_compile=True)
    model.fit(digits.x_train[:256], digits.y_train[:256], batch_size=64, epochs=2, verbose=0)
    for v in kflip.binary_variables(model):
        assert set(np.unique(v.numpy())) <= {-1.0, 1.0}
        slot = opt.get_slot(v, "tensor").numpy()
        assert slot.shape == (2,) and np.all(np.isfinite(slot)) and slot[0] > 0
    assert opt.state_bytes_per_weight == 8  # per-tensor state costs nothing per weight
    again = kflip.FlipLSTM.from_config(opt.get_config())
    np.testing.assert_array_equal(again.lstm_weights.tensor_kernel, w.tensor_kernel)


def test_meta_training_vector_carries_the_conditioning():
    w = conditioned()
    vec = unroll.flatten(w)
    assert len(vec) == unroll.num_params(2, True) == unroll.num_params(2) + 4 * 9
    back = unroll.unflatten(vec, 2)
    np.testing.assert_array_equal(back.tensor_kernel, w.tensor_kernel)
    cfg = MetaConfig(tensor_features=True)
    mask = meta_config.trainable_mask(cfg)
    assert len(mask) == unroll.num_params(1, True)
    block = mask[-20:].reshape(4, 5)  # features x (input, forget, candidate, output, threshold)
    assert block[:, [0, 1, 3, 4]].all() and not block[:, 2].any()  # no candidate drive
    x0 = unroll.flatten(meta_config.initial_weights(cfg), True)
    scales = meta_config.coordinate_scales(x0, cfg.zero_scale, cfg.tensor_scale, 1)
    assert np.all(scales[-20:] == cfg.tensor_scale)


def test_conditioned_unroll_compiles_and_trains():
    w = conditioned(kflip.bop_weights(), scale=0.3)
    task = tasks.make_task("mlp-32", "digits", 1, horizon=30)
    fn = unroll.get_unroll("mlp-32", 1, w.beta, w.eps, conditioned=True)
    res = fn(tf.constant(unroll.flatten(w), tf.float32), *task.unroll_args())
    assert np.isfinite(float(res.meta_loss)) and float(res.flip_fraction) > 0
    assert all(set(np.unique(k.numpy())) <= {-1.0, 1.0} for k in res.kernels)


def test_bad_tensor_kernel_is_refused():
    with pytest.raises(ValueError, match="tensor_kernel"):
        dataclasses.replace(kflip.bop_weights(), tensor_kernel=np.zeros((3, 5)))
    with pytest.raises(ValueError, match="tensor_kernel"):
        dataclasses.replace(kflip.bop_weights(), tensor_kernel=np.full((4, 5), np.nan))
    assert cell_lib.LSTMWeights.from_config(conditioned().get_config()).conditioned


def test_meta_training_learns_a_conditioned_rule_over_lengths(tmp_path):
    from kflip.meta import meta_train

    cfg = MetaConfig(iterations=1, pairs=2, horizon=24, min_horizon=8, baseline="bop",
                     tensor_features=True, train_examples=128, families=("mlp-32",),
                     datasets=("digits",), val_tasks=1, eval_every=1, seed=1)
    w = meta_train(cfg, out=str(tmp_path / "w.npz"), workers=1)
    meta = w.metadata["data"]
    assert meta["steps_per_task"] == "log-uniform in [8, 24]"
    assert meta["meta_loss"] == "relative to Bop's on the same task"
    # the initial rule is Bop itself: its validation meta-loss relative to Bop is 0
    assert w.metadata["val_curve"][0]["val_meta_loss"] == 0.0
    if w.metadata["best_iteration"] == 1:  # the ES step moved the conditioning
        assert w.conditioned
    loaded = kflip.LSTMWeights.load(str(tmp_path / "w.npz"))
    np.testing.assert_array_equal(loaded.tensor_kernel, w.tensor_kernel)
