"""Bop2ndOrder: step-for-step against a NumPy reference, +-1 kernels, config, save/load.

The reference below is written from the paper's rule, independently of
``kflip/bop2nd.py``. Training runs go through ``model.compile(jit_compile=True)`` +
``fit`` (the gradients the optimizer receives are recorded by a subclass that only
copies them into variables) and through a ``tf.GradientTape`` step compiled with
``jit_compile=True``; the reference is fed those gradients and must reproduce every
flip and the ``m`` and ``v`` slots. Mutated references (off-by-one bias correction,
epsilon inside the square root, ...) must *not* reproduce them, which shows the
comparison would catch those mistakes.
"""

import numpy as np
import pytest
import kflip  # noqa: I001  (before TensorFlow: selects Keras 2)
import larq as lq
import tensorflow as tf
from conftest import is_pm1, small_mlp

LOSS = "sparse_categorical_crossentropy"
N, BATCH, EPOCHS = 768, 64, 2  # 12 steps per epoch, 24 steps
Schedules = tf.keras.optimizers.schedules
F32 = lambda x: float(np.float32(x))  # noqa: E731  (TF keeps hyperparameters in float32)


# ---- NumPy reference -----------------------------------------------------------------
def _at(hyper, step0):
    """A hyperparameter's value on the step whose 0-based index is ``step0``."""
    if isinstance(hyper, Schedules.LearningRateSchedule):
        return F32(hyper(float(step0)))
    return F32(hyper)


def reference_step(w, m, v, g, t, hp, variant=""):
    """One Bop2ndOrder step in float64. ``t`` is 1-based. Returns w, m, v, margin.

    ``margin`` is the relative distance of the flip statistic to the threshold, so a
    float32-vs-float64 disagreement right at the threshold can be told from a bug.
    ``variant`` names a deliberately wrong rule (the mutants).
    """
    step0 = t if variant == "schedule_1_based" else t - 1
    gamma, sigma, tau = (_at(hp[k], step0) for k in ("gamma", "sigma", "threshold"))
    eps = F32(hp.get("epsilon", 1e-10))
    if variant == "swap_gamma_sigma":
        gamma, sigma = sigma, gamma
    g = g.astype(np.float64)
    m = m + gamma * (g - m)
    v = v + sigma * (g**2 - v)
    m_hat, v_hat = m, v
    if hp.get("bias_correction", False) or variant == "corrected_anyway":
        tc = t + 1 if variant == "t_off_by_one" else t
        m_hat = m / (1.0 - (1.0 - gamma) ** tc)
        v_hat = v / (1.0 - (1.0 - sigma) ** tc)
    if variant == "eps_inside_sqrt":
        ratio = m_hat / np.sqrt(v_hat + eps)
    else:
        ratio = m_hat / (np.sqrt(v_hat) + eps)
    s = np.where(w >= 0, 1.0, -1.0)
    same_sign = np.sign(m) == s
    if variant == "opposite_sign":
        same_sign = ~same_sign
    if variant == "no_sign_test":
        same_sign = np.ones_like(same_sign)
    flip = (np.abs(ratio) > tau) & same_sign
    margin = np.abs(np.abs(ratio) - tau) / max(tau, 1e-30)
    return np.where(flip, -s, s), m, v, margin


def replay(records, hp, variant=""):
    """Run the reference on recorded gradients; the first step it disagrees, or None.

    Flips must agree except where the statistic is within 1e-5 (relative) of the
    threshold; there the reference adopts the optimizer's choice (counted).
    """
    state = [(w.astype(np.float64), np.zeros(w.shape), np.zeros(w.shape))
             for w in records[0]["before"]]
    ambiguous = 0
    for t, rec in enumerate(records, start=1):
        new_state = []
        for k, ((w, m, v), g) in enumerate(zip(state, rec["grads"])):
            w, m, v, margin = reference_step(w, m, v, g, t, hp, variant)
            differ = w != rec["after"][k]
            if np.any(differ & (margin > 1e-5)):
                return t, ambiguous
            ambiguous += int(differ.sum())
            w = rec["after"][k].astype(np.float64)
            scale = max(np.abs(m).max(), 1e-30), max(np.abs(v).max(), 1e-30)
            if not (np.allclose(rec["m"][k], m, rtol=1e-6, atol=2e-6 * scale[0])
                    and np.allclose(rec["v"][k], v, rtol=1e-6, atol=2e-6 * scale[1])):
                return t, ambiguous
            new_state.append((w, m, v))
        state = new_state
    return None, ambiguous


# ---- recorded training runs --------------------------------------------------------
class Recording(kflip.Bop2ndOrder):
    """Bop2ndOrder that also copies each gradient it applies into a variable."""

    def record(self, variables):
        self.recorded = {v.ref(): tf.Variable(tf.zeros_like(v), trainable=False) for v in variables}

    def _resource_apply_dense(self, grad, var, apply_state=None):
        with tf.control_dependencies([self.recorded[var.ref()].assign(grad)]):
            return super()._resource_apply_dense(grad, var, apply_state)


def case(bop2):
    return lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, bop2),
        default_optimizer=tf.keras.optimizers.legacy.Adam(0.01))


def train_recorded(digits, hp, source="fit"):
    tf.keras.backend.clear_session()
    model = small_mlp(hidden=(32,))  # exact +-1 kernels, 64*32 + 32*10 binary weights
    binary = kflip.binary_variables(model)
    bop2 = Recording(**hp)
    bop2.record(binary)
    opt = case(bop2)
    records = []

    def snapshot(before):
        records.append({
            "before": before,
            "after": [v.numpy().copy() for v in binary],
            "grads": [bop2.recorded[v.ref()].numpy().copy() for v in binary],
            "m": [bop2.get_slot(v, "m").numpy().copy() for v in binary],
            "v": [bop2.get_slot(v, "v").numpy().copy() for v in binary],
        })

    x, y = digits.x_train[:N], digits.y_train[:N]
    if source == "fit":
        class Snap(tf.keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                self.before = [v.numpy().copy() for v in binary]

            def on_train_batch_end(self, batch, logs=None):
                snapshot(self.before)

        model.compile(opt, LOSS, jit_compile=True)
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=[Snap()])
    else:
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()

        @tf.function(jit_compile=True)
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        for _ in range(EPOCHS):
            for i in range(0, N, BATCH):
                before = [v.numpy().copy() for v in binary]
                step(x[i:i + BATCH], y[i:i + BATCH])
                snapshot(before)
    assert int(bop2.iterations) == len(records) == EPOCHS * N // BATCH
    return records


CONFIGS = {
    "biased": dict(gamma=0.05, sigma=0.02, threshold=0.5),
    "corrected": dict(gamma=0.05, sigma=0.02, threshold=0.8, bias_correction=True),
    # epsilon comparable to sqrt(v) (~1e-3 here), so where it is added matters
    "big_epsilon": dict(gamma=0.05, sigma=0.02, threshold=0.3, epsilon=5e-4),
    "schedules": dict(
        gamma=Schedules.PiecewiseConstantDecay([8], [0.05, 0.1]),
        sigma=Schedules.ExponentialDecay(0.02, decay_steps=10, decay_rate=0.5),
        threshold=Schedules.PiecewiseConstantDecay([4, 12], [1e3, 0.5, 0.35]),
        bias_correction=True),
}
MUTANTS = {  # config -> wrong rules the comparison must reject
    "biased": ["opposite_sign", "no_sign_test", "corrected_anyway", "swap_gamma_sigma"],
    "corrected": ["t_off_by_one"],
    "big_epsilon": ["eps_inside_sqrt"],
    "schedules": ["schedule_1_based"],
}
_RUNS = {}


def recorded(digits, name, source="fit"):
    if (name, source) not in _RUNS:
        _RUNS[name, source] = train_recorded(digits, CONFIGS[name], source)
    return _RUNS[name, source]


def _flips_per_step(records):
    return [sum(int((b != a).sum()) for b, a in zip(r["before"], r["after"])) for r in records]


# ---- (a) the rule, step for step ---------------------------------------------------
@pytest.mark.parametrize("name, source", [(n, "fit") for n in CONFIGS] + [("biased", "tape")])
def test_matches_numpy_reference_step_for_step(digits, name, source):
    records = recorded(digits, name, source)
    flips = _flips_per_step(records)
    size = sum(w.size for w in records[0]["before"])
    # a meaningful run: flips on many steps, never all weights
    assert sum(f > 0 for f in flips) >= 8 and max(flips) < size, flips
    bad_step, ambiguous = replay(records, CONFIGS[name])
    assert bad_step is None, f"reference disagrees at step {bad_step}; flips {flips}"
    assert ambiguous <= 2


@pytest.mark.parametrize("name, variant", [(n, v) for n, vs in MUTANTS.items() for v in vs])
def test_wrong_rules_are_caught(digits, name, variant):
    with np.errstate(divide="ignore", invalid="ignore"):
        bad_step, _ = replay(recorded(digits, name), CONFIGS[name], variant)
    assert bad_step is not None, f"the comparison does not notice {variant!r}"


def test_schedules_hold_flips_until_the_threshold_drops(digits):
    flips = _flips_per_step(recorded(digits, "schedules"))
    assert flips[:5] == [0] * 5 and sum(flips[5:]) > 0  # threshold 1e3 on iterations 0..4


def xla_apply(opt, var):
    """``g -> opt.apply_gradients([(g, var)])`` compiled with XLA."""
    @tf.function(jit_compile=True)
    def apply(g):
        opt.apply_gradients([(g, var)])
    return apply


def test_first_step_bias_correction_makes_the_statistic_sign_g(digits):
    # Step 1, bias-corrected: m_hat = g, v_hat = g**2, so m_hat / sqrt(v_hat) = +-1 for
    # any gamma, sigma: with threshold 0.99 every weight whose gradient has its sign
    # flips. The biased statistic is gamma / sqrt(sigma) = 1e-5 and nothing flips.
    w0 = np.where(np.random.RandomState(0).rand(50, 20) < 0.5, -1.0, 1.0).astype("float32")
    g = np.random.RandomState(1).randn(50, 20).astype("float32")
    for correction, expected in [(True, np.where(g * w0 > 0, -w0, w0)), (False, w0)]:
        var = tf.Variable(w0)
        opt = kflip.Bop2ndOrder(threshold=0.99, gamma=1e-6, sigma=1e-2,
                                bias_correction=correction)
        xla_apply(opt, var)(tf.constant(g))
        np.testing.assert_array_equal(var.numpy(), expected)


@pytest.mark.parametrize("correction", [False, True])
def test_gamma_sigma_one_is_sign_descent(correction):
    # gamma = sigma = 1: m = g, v = g**2, no history; every weight ends at -sign(g).
    var = tf.Variable(np.ones((30, 30), "float32"))
    opt = kflip.Bop2ndOrder(threshold=0.5, gamma=1.0, sigma=1.0, bias_correction=correction)
    step = xla_apply(opt, var)
    rng = np.random.RandomState(0)
    for _ in range(3):
        g = rng.randn(30, 30).astype("float32")
        step(tf.constant(g))
        np.testing.assert_array_equal(var.numpy(), -np.sign(g))


def test_large_epsilon_reduces_to_larq_bop():
    # epsilon >> sqrt(v): m / (sqrt(v) + eps) ~ m / eps, i.e. Bop with threshold tau*eps.
    rng = np.random.RandomState(0)
    w0 = np.where(rng.rand(40, 25) < 0.5, -1.0, 1.0).astype("float32")
    a, b = tf.Variable(w0), tf.Variable(w0)
    bop = lq.optimizers.Bop(threshold=1e-3, gamma=0.1)
    bop2 = kflip.Bop2ndOrder(threshold=1e-3 / 1e4, gamma=0.1, sigma=0.3, epsilon=1e4)
    drift = rng.randn(40, 25) * 1e-2
    total = 0
    for _ in range(25):
        g = tf.constant((drift + rng.randn(40, 25) * 2e-2).astype("float32"))
        before = a.numpy()
        bop.apply_gradients([(g, a)])
        bop2.apply_gradients([(g, b)])
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        total += int((before != a.numpy()).sum())
    assert total > 20


# ---- (c) kernels stay exactly +-1 --------------------------------------------------
@pytest.mark.parametrize("correction", [False, True])
def test_fit_with_xla_keeps_kernels_exactly_pm1(digits, correction):
    tf.keras.utils.set_random_seed(0)
    model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(32, 32))  # float init
    assert not is_pm1([v.numpy() for v in kflip.binary_variables(model)])
    bop2 = kflip.Bop2ndOrder(bias_correction=correction)  # the authors' defaults
    model.compile(case(bop2), LOSS, metrics=["accuracy"], jit_compile=True)
    history = model.fit(digits.x_train, digits.y_train, batch_size=64, epochs=2, verbose=0)
    assert is_pm1([v.numpy() for v in kflip.binary_variables(model)])
    kflip.assert_binary(model)
    assert int(bop2.iterations) == 2 * 23 and np.isfinite(history.history["loss"]).all()


def test_nan_gradients_never_corrupt_binary_weights():
    var = tf.Variable(np.array([1.0, -1.0, 1.0, -1.0], "float32"))
    opt = kflip.Bop2ndOrder(threshold=0.0, gamma=0.5, sigma=0.5)
    opt.apply_gradients([(tf.constant([np.nan, np.inf, -np.inf, 1.0]), var)])
    assert is_pm1([var.numpy()])


# ---- (d) config, Keras (de)serialisation, save/load, checkpoints ----------------------
def test_config_round_trip():
    for bop2 in [kflip.Bop2ndOrder(), kflip.Bop2ndOrder(**CONFIGS["schedules"], epsilon=1e-7,
                                                         name="b2", clipnorm=1.0)]:
        config = bop2.get_config()
        back = kflip.Bop2ndOrder.from_config(config)
        assert back.get_config() == config
        again = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(bop2),
                                                use_legacy_optimizer=True)
        assert type(again) is kflip.Bop2ndOrder and again.get_config() == config
    assert kflip.Bop2ndOrder().get_config() == {
        "name": "Bop2ndOrder", "threshold": 1e-6, "gamma": 1e-6, "sigma": 1e-2,
        "bias_correction": False, "epsilon": 1e-10}
    assert isinstance(back._get_hyper("threshold"), Schedules.PiecewiseConstantDecay)
    assert back.bias_correction is True and back.clipnorm == 1.0


def test_save_and_load_keras_file(digits, tmp_path):
    model = small_mlp(hidden=(32,))
    bop2 = kflip.Bop2ndOrder(threshold=Schedules.ExponentialDecay(1e-6, 100, 0.5), sigma=1e-3)
    model.compile(case(bop2), LOSS, jit_compile=True)
    model.fit(digits.x_train[:256], digits.y_train[:256], batch_size=64, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)

    loaded = tf.keras.models.load_model(path)
    inner = loaded.optimizer.optimizers[0]
    assert isinstance(loaded.optimizer, lq.optimizers.CaseOptimizer)
    assert type(inner) is kflip.Bop2ndOrder and inner.get_config() == bop2.get_config()
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = digits.x_test[:32]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)

    # larq's CaseOptimizer keys its variable -> optimizer map by variable ids, which a
    # loaded model does not share: recompile with a fresh CaseOptimizer (docs/bop2nd.md).
    fresh = kflip.Bop2ndOrder.from_config(inner.get_config())
    loaded.compile(case(fresh), LOSS, jit_compile=True)
    before = [v.numpy() for v in kflip.binary_variables(loaded)]
    loaded.fit(digits.x_train[:256], digits.y_train[:256], batch_size=64, verbose=0)
    after = [v.numpy() for v in kflip.binary_variables(loaded)]
    assert int(fresh.iterations) == 4 and is_pm1(after)
    assert any(np.any(b != a) for b, a in zip(before, after))


def test_checkpoint_resume_continues_exactly(digits, tmp_path):
    def fresh():
        tf.keras.backend.clear_session()
        model = small_mlp(hidden=(32,))
        bop2 = kflip.Bop2ndOrder(**CONFIGS["corrected"])
        model.compile(case(bop2), LOSS, jit_compile=True)
        return model, bop2

    def state(model, bop2):
        binary = kflip.binary_variables(model)
        slots = [bop2.get_slot(v, s).numpy() for v in binary for s in ("m", "v")]
        return [v.numpy() for v in model.variables] + slots, int(bop2.iterations)

    batches = [(digits.x_train[i:i + 64], digits.y_train[i:i + 64]) for i in range(0, 640, 64)]
    model, bop2 = fresh()
    for x, y in batches[:5]:
        model.train_on_batch(x, y)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "c"))
    for x, y in batches[5:]:
        model.train_on_batch(x, y)
    expected = state(model, bop2)

    model2, bop2b = fresh()
    tf.train.Checkpoint(model=model2, optimizer=model2.optimizer).restore(path)
    for x, y in batches[5:]:
        model2.train_on_batch(x, y)
    got = state(model2, bop2b)
    assert got[1] == expected[1] == 10
    for a, b in zip(got[0], expected[0]):
        np.testing.assert_array_equal(a, b)


# ---- (f) invalid arguments ---------------------------------------------------------
@pytest.mark.parametrize("kwargs, param", [
    (dict(threshold=-1e-6), "threshold"), (dict(threshold=float("nan")), "threshold"),
    (dict(threshold=float("inf")), "threshold"), (dict(threshold="1e-6"), "threshold"),
    (dict(threshold=True), "threshold"),
    (dict(gamma=0.0), "gamma"), (dict(gamma=1.5), "gamma"), (dict(gamma=-0.1), "gamma"),
    (dict(gamma=float("nan")), "gamma"), (dict(gamma=None), "gamma"),
    (dict(sigma=0.0), "sigma"), (dict(sigma=2.0), "sigma"), (dict(sigma=float("inf")), "sigma"),
    (dict(epsilon=0.0), "epsilon"), (dict(epsilon=-1e-8), "epsilon"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(bias_correction=1), "bias_correction"), (dict(bias_correction="yes"), "bias_correction"),
    (dict(bias_correction=None), "bias_correction"),
    (dict(name=""), "name"),
])
def test_invalid_arguments_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=f"`{param}`"):
        kflip.Bop2ndOrder(**kwargs)


def test_numpy_scalars_and_schedules_are_accepted():
    bop2 = kflip.Bop2ndOrder(threshold=np.float32(1e-5), gamma=np.float64(1e-3),
                             sigma=Schedules.ExponentialDecay(1e-2, 10, 0.5),
                             bias_correction=np.bool_(True))
    assert bop2.get_config()["threshold"] == 1e-5 and bop2.bias_correction is True


# ---- docs ----------------------------------------------------------------------------
