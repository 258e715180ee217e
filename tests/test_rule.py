"""The flip rule as a pure transformation (kflip.rule) and the functional Adam (kflip.adam)."""

import numpy as np
import pytest
import tensorflow as tf

import kflip
from conftest import random_lstm_weights
from kflip import cell as C
from kflip.adam import Adam
from kflip.rule import FlipRule, FlipState


def _rule(w, constant=False, **options):
    return FlipRule(C.CellTensors.from_weights(w, constant=constant), w.beta, w.eps, **options)


def _state(h, c, v=0.0, step=0):
    return FlipState(h, c, tf.constant(v), tf.constant(step, tf.int64), tf.constant(0, tf.int64))


def test_update_flips_iff_output_negative_and_reframes_state():
    w = random_lstm_weights(hidden=1, seed=3)
    rule = _rule(w)
    rng = np.random.RandomState(0)
    theta = tf.constant(np.sign(rng.randn(200)).astype(np.float32))
    grad = tf.constant(rng.randn(200).astype(np.float32) * 1e-3)
    h = tf.constant(rng.randn(200, 1).astype(np.float32) * 0.2)
    c = tf.constant(rng.randn(200, 1).astype(np.float32) * 0.2)
    signs, new = rule.update(grad, _state(h, c), theta)
    feats, _, _ = C.features_and_moment(theta, grad, tf.constant(0.0), 1.0, w.beta, w.eps)
    y, h_raw, c_raw = C.lstm_cell(rule.cell, feats, h, c)
    y = y.numpy()
    np.testing.assert_array_equal(signs.numpy(), np.where(y < 0, -1.0, 1.0))
    assert 0 < (y < 0).sum() < 200  # the test exercises both branches
    np.testing.assert_allclose(new.h.numpy(), h_raw.numpy() * signs.numpy()[:, None])
    np.testing.assert_allclose(new.c.numpy(), c_raw.numpy() * signs.numpy()[:, None])
    assert int(new.step) == 1 and int(new.flips) == int((y < 0).sum())


def test_rule_is_symmetric_under_global_sign_flip():
    """(theta, g) -> (-theta, -g) gives the same decisions: the rule lives in the weight's frame."""
    rule = _rule(random_lstm_weights(hidden=2, seed=5))
    rng = np.random.RandomState(0)
    theta = np.sign(rng.randn(300)).astype(np.float32)
    grad = rng.randn(300).astype(np.float32)
    h = tf.zeros([300, 2])
    a, _ = rule.update(tf.constant(grad), _state(h, h), tf.constant(theta))
    b, _ = rule.update(tf.constant(-grad), _state(h, h), tf.constant(-theta))
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e19])
def test_a_bad_gradient_skips_the_tensor_and_keeps_its_state(bad):
    """One NaN/Inf entry (or a finite spike whose square overflows) skips the tensor."""
    rule = _rule(kflip.bop_weights(threshold=0.0, gamma=0.5))  # flips on any favourable gradient
    grad = tf.constant([1.0, bad, 1.0, -1.0], tf.float32)
    h = tf.constant([[0.25], [0.5], [-0.25], [0.125]])
    c = 2 * h
    signs, new = rule.update(grad, _state(h, c, v=0.5, step=3), tf.ones([4]))
    np.testing.assert_array_equal(signs.numpy(), [1, 1, 1, 1])
    np.testing.assert_array_equal(new.h.numpy(), h.numpy())
    np.testing.assert_array_equal(new.c.numpy(), c.numpy())
    assert float(new.v) == 0.5 and int(new.flips) == 0 and int(new.step) == 4
    good, _ = rule.update(tf.constant([1.0, 1.0, 1.0, -1.0]), _state(h, c, 0.5, 3), tf.ones([4]))
    assert (good.numpy() < 0).sum() > 0  # the same state flips on a finite gradient


def test_a_bad_tensor_does_not_stop_the_others():
    rule = _rule(kflip.bop_weights(threshold=0.0, gamma=0.5))
    params = [tf.ones([3]), tf.ones([2])]
    grads = [tf.constant([1.0, np.nan, 1.0]), tf.constant([1.0, 1.0])]
    signs, new = rule.update(grads, rule.init(params), params)
    np.testing.assert_array_equal(signs[0].numpy(), [1, 1, 1])
    np.testing.assert_array_equal(signs[1].numpy(), [-1, -1])
    assert [int(f) for f in new.flips] == [0, 2]


def test_max_flip_rate_keeps_the_most_negative_outputs():
    w = kflip.bop_weights(threshold=0.0, gamma=0.5)
    grad = tf.constant(np.linspace(0.1, 1.0, 10).astype(np.float32))  # all want to flip theta=+1
    z = tf.zeros([10, 1])
    free, _ = _rule(w).update(grad, _state(z, z), tf.ones([10]))
    assert (free.numpy() < 0).sum() == 10
    capped, new = _rule(w, max_flip_rate=0.3).update(grad, _state(z, z), tf.ones([10]))
    np.testing.assert_array_equal(np.where(capped.numpy() < 0)[0], [7, 8, 9])
    assert int(new.flips) == 3


def test_padding_hidden_units_is_inert():
    w = kflip.bop_weights(threshold=1e-3, gamma=0.1)
    wide = w.padded(3)
    assert wide.hidden_size == 3
    rng = np.random.RandomState(0)
    theta = tf.constant(np.sign(rng.randn(100)).astype(np.float32))
    narrow_rule, wide_rule = _rule(w), _rule(wide)
    a_state, b_state = narrow_rule.init(theta), wide_rule.init(theta)
    s1, s3 = [], []
    for _ in range(19):
        grad = tf.constant(rng.randn(100).astype(np.float32) * 1e-2)
        a, a_state = narrow_rule.update(grad, a_state, theta)
        b, b_state = wide_rule.update(grad, b_state, theta)
        s1.append(a.numpy())
        s3.append(b.numpy())
        theta = theta * a
    np.testing.assert_array_equal(np.array(s1), np.array(s3))
    assert np.sum(np.array(s1) < 0) > 0
    with pytest.raises(ValueError, match="hidden_size"):
        wide.padded(2)


def _tensors(seed, shapes=((30, 7), (3, 3, 2, 4), (11,))):
    rng = np.random.RandomState(seed)
    return [tf.constant(np.sign(rng.randn(*s) + 1e-9).astype(np.float32)) for s in shapes], [
        tf.constant(rng.randn(*s).astype(np.float32) * 1e-2) for s in shapes
    ]


@pytest.mark.parametrize("hidden", [1, 2])
def test_a_list_of_tensors_is_each_tensor_on_its_own(hidden):
    w = kflip.bop_weights(0.5, 0.3, normalized=True, scale=1.0).padded(hidden)
    if hidden > 1:  # let the extra unit take part
        w = kflip.LSTMWeights(**{**w.get_config(), "recurrent": 0.3 * np.ones((2, 8))})
    rule = _rule(w)
    params, _ = _tensors(0)
    state = rule.init(params)
    assert isinstance(state.h, tuple) and len(state.h) == 3
    assert state.h[1].shape == (3, 3, 2, 4, hidden) and state.v[2].shape == ()
    singles = [rule.init(p) for p in params]
    for t in range(5):
        _, grads = _tensors(100 + t)
        signs, state = rule.update(grads, state, params)
        for j, p in enumerate(params):
            s_j, singles[j] = rule.update(grads[j], singles[j], p)
            np.testing.assert_array_equal(signs[j].numpy(), s_j.numpy())
            np.testing.assert_array_equal(state.c[j].numpy(), singles[j].c.numpy())
            assert int(state.flips[j]) == int(singles[j].flips)
        params = [p * s for p, s in zip(params, signs)]
    assert int(state.step) == 5 and sum(int(f) for f in state.flips) > 0


def test_update_compiles_under_xla_and_equals_eager():
    rule = _rule(random_lstm_weights(hidden=2, seed=4), constant=True)
    params, grads = _tensors(7)
    state = rule.init(params)
    compiled = tf.function(lambda g, s, p: rule.update(g, s, p), jit_compile=True)
    eager_s, eager_state = rule.update(grads, state, params)
    xla_s, xla_state = compiled(grads, state, params)
    for a, b in zip(eager_s, xla_s):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(tf.nest.flatten(eager_state), tf.nest.flatten(xla_state)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_latent_update_steps_latent_weights_by_the_rms_normalised_output():
    rule = _rule(kflip.bop_weights(0.0, 0.5, normalized=True, scale=1.0))
    rng = np.random.RandomState(0)
    w = tf.constant(rng.randn(50).astype(np.float32) * 0.01)
    grad = tf.constant(rng.randn(50).astype(np.float32))
    state = rule.init(w)
    new_w, new = rule.latent_update(grad, state, w, learning_rate=0.02, clip=1.0)
    theta = C.sign_pm1(w)
    feats, _, _ = C.features_and_moment(theta, grad, tf.constant(0.0), 1.0, rule.beta, rule.eps)
    y, _, _ = C.lstm_cell(rule.cell, feats, state.h, state.c)
    step = 0.02 * theta * y / tf.sqrt(tf.reduce_mean(tf.square(y)))
    np.testing.assert_allclose(new_w.numpy(), (w + step).numpy(), rtol=1e-5, atol=1e-8)
    crossed = int(np.sum(np.sign(new_w.numpy()) != np.sign(w.numpy())))
    assert int(new.flips) == crossed > 0


# ---- the functional Adam ---------------------------------------------------------
def test_functional_adam_equals_tf_keras_adam_step_for_step():
    rng = np.random.RandomState(0)
    init = [rng.randn(5, 3).astype(np.float32), rng.randn(4).astype(np.float32)]
    keras_vars = [tf.Variable(a) for a in init]
    keras_adam = tf.keras.optimizers.legacy.Adam(learning_rate=0.01)
    adam = Adam(learning_rate=0.01)
    params = tuple(tf.constant(a) for a in init)
    state = adam.init(params)
    for _ in range(50):
        grads = tuple(tf.constant(rng.randn(*a.shape).astype(np.float32)) for a in init)
        keras_adam.apply_gradients(zip(grads, keras_vars))
        params, state = adam.update(grads, state, params)
        for p, v in zip(params, keras_vars):  # same update; Keras scales eps by sqrt(1-b2^t)
            np.testing.assert_allclose(p.numpy(), v.numpy(), rtol=1e-5, atol=2e-6)
    assert int(state.count) == 50


def test_functional_adam_on_numpy_keeps_float64_and_a_python_count():
    adam = Adam(learning_rate=0.05, eps=1e-8)
    x = np.array([0.5, -1.5, 2.0])
    state = adam.init(x)
    for _ in range(3):
        x, state = adam.update(2 * x, state, x)
    assert x.dtype == np.float64 and state.count == 3 and isinstance(state.count, int)
    # NumPy reference of Kingma & Ba's Algorithm 1, written out
    ref, m, v = np.array([0.5, -1.5, 2.0]), 0.0, 0.0
    for t in range(1, 4):
        g = 2 * ref
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        ref = ref - 0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(x, ref, rtol=1e-12)
