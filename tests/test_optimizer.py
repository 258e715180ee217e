"""kflip.FlipLSTM as a Keras optimizer."""

import os
import subprocess
import sys
import warnings

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from conftest import binary_values, is_pm1, small_cnn, small_mlp

import kflip

LOSS = "sparse_categorical_crossentropy"


def bop_case(threshold=1e-6, gamma=1e-3):
    return lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, lq.optimizers.Bop(threshold=threshold, gamma=gamma)),
        default_optimizer=tf.keras.optimizers.legacy.Adam(0.01),
    )


def fit_recording(model, opt, digits, epochs=2, jit=True):
    """Fit without shuffling; return the binary weights after every step."""
    model.compile(opt, LOSS, jit_compile=jit)
    trace = []

    class Record(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            trace.append(binary_values(model))

    model.fit(digits.x_train, digits.y_train, batch_size=64, epochs=epochs, shuffle=False,
              verbose=0, callbacks=[Record()])
    return trace


@pytest.mark.parametrize("wrap", ["standalone", "case_optimizer"])
def test_bop_initialisation_reproduces_larq_bop_flip_for_flip(digits, wrap):
    """Equivalence test: the analytic LSTM init is Bop, step for step, under XLA."""
    flip = kflip.FlipLSTM(kflip.bop_weights(threshold=1e-6, gamma=1e-3),
                          tf.keras.optimizers.legacy.Adam(0.01))
    if wrap == "case_optimizer":
        flip = lq.optimizers.CaseOptimizer(
            (kflip.is_binary_variable, flip), default_optimizer=tf.keras.optimizers.legacy.Adam(0.01)
        )
    ref = fit_recording(small_mlp(hidden=(64, 64)), bop_case(), digits)
    got = fit_recording(small_mlp(hidden=(64, 64)), flip, digits)
    assert len(ref) == len(got) == 46
    for step, (a, b) in enumerate(zip(ref, got)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y, err_msg=f"step {step}")
    changed = sum(int((x != y).sum()) for x, y in zip(ref[0], ref[-1]))
    assert changed > 100  # Bop really flipped weights in this run
    assert is_pm1(got[-1])


def test_first_step_snaps_noop_kernels_and_they_stay_pm1(digits):
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        tf.keras.layers.Flatten(),
        lq.layers.QuantDense(32, kernel_quantizer=lq.quantizers.NoOp(precision=1), use_bias=False),
        tf.keras.layers.BatchNormalization(),
        lq.layers.QuantDense(10, kernel_quantizer=lq.quantizers.NoOp(precision=1)),
        tf.keras.layers.Activation("softmax"),
    ])
    assert not is_pm1(binary_values(model))  # glorot floats before training
    model.compile(kflip.FlipLSTM(kflip.bop_weights(0.0, 0.1)), LOSS, jit_compile=True)
    model.train_on_batch(digits.x_train[:64], digits.y_train[:64])
    assert is_pm1(binary_values(model))
    model.fit(digits.x_train, digits.y_train, batch_size=64, epochs=1, verbose=0)
    assert is_pm1(binary_values(model))
    assert sum(model.optimizer.flip_counts().values()) > 0


def _custom_step(model, opt):
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss
    return step


def test_xla_step_compiles_and_matches_the_non_xla_step(digits):
    x, y = tf.constant(digits.x_train[:64]), tf.constant(digits.y_train[:64])
    results = {}
    for jit in (True, False):
        model = small_cnn(seed=1)
        opt = kflip.FlipLSTM(kflip.bop_weights(1e-4, 0.2))
        opt._create_all_weights(model.trainable_variables)
        step = tf.function(_custom_step(model, opt), jit_compile=jit)
        if jit:  # proves the whole step (forward, backward, FlipLSTM update) lowers to XLA
            hlo = step.experimental_get_compiler_ir(x, y)(stage="hlo")
            assert "ENTRY" in hlo and "tanh" in hlo
        for i in range(5):
            step(tf.constant(digits.x_train[64 * i: 64 * (i + 1)]), tf.constant(digits.y_train[64 * i: 64 * (i + 1)]))
        results[jit] = (binary_values(model),
                        [opt.lstm_state(v)[1].numpy() for v in kflip.binary_variables(model)],
                        sum(opt.flip_counts().values()))
    (bx, cx, nx), (be, ce, ne) = results[True], results[False]
    assert nx > 0 and nx == ne
    for a, b in zip(bx, be):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(cx, ce):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_float_variables_are_trained_by_the_inner_optimizer(digits):
    model = small_mlp()
    opt = kflip.FlipLSTM(float_optimizer=tf.keras.optimizers.legacy.Adam(0.05))
    model.compile(opt, LOSS, jit_compile=True)
    ref = small_mlp()
    ref.compile(tf.keras.optimizers.legacy.Adam(0.05), LOSS, jit_compile=True)
    batch = (digits.x_train[:64], digits.y_train[:64])
    model.train_on_batch(*batch)
    ref.train_on_batch(*batch)
    floats = [v for v in model.trainable_variables if not kflip.is_binary_variable(v)]
    ref_floats = [v for v in ref.trainable_variables if not kflip.is_binary_variable(v)]
    assert floats
    for a, b in zip(floats, ref_floats):  # first step: same gradients -> same Adam update
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
        assert opt.float_optimizer.get_slot(a, "m") is not None
        with pytest.raises(KeyError):
            opt.get_slot(a, "h0")  # no LSTM state for float variables
    for v in kflip.binary_variables(model):
        assert opt.lstm_state(v)[0].shape == v.shape + (opt.hidden_size,)
    assert int(opt.iterations) == 1 and int(opt.float_optimizer.iterations) == 1


def test_state_is_at_most_16_bytes_per_binary_weight(digits):
    model = small_mlp()
    opt = kflip.FlipLSTM()
    model.compile(opt, LOSS)
    model.train_on_batch(digits.x_train[:64], digits.y_train[:64])
    n = sum(int(np.prod(v.shape)) for v in kflip.binary_variables(model))
    per_weight = sum(x.numpy().nbytes for v in kflip.binary_variables(model) for x in opt.lstm_state(v))
    assert per_weight / n == opt.state_bytes_per_weight <= 16


def test_config_roundtrip_and_keras_deserialize():
    sched = tf.keras.optimizers.schedules.PiecewiseConstantDecay([10], [1e-3, 0.0])
    opt = kflip.FlipLSTM(kflip.bop_weights(1e-5, 1e-2, hidden_size=2), "sgd",
                         flip_threshold=sched, max_flip_rate=0.05)
    config = opt.get_config()
    back = kflip.FlipLSTM.from_config(config)
    again_config = back.get_config()
    assert again_config["float_optimizer"]["config"] == config["float_optimizer"]["config"]
    strip = lambda c: {k: v for k, v in c.items() if k != "float_optimizer"}  # noqa: E731
    assert strip(again_config) == strip(config)
    assert back.hidden_size == 2 and back.max_flip_rate == 0.05
    assert isinstance(back.float_optimizer, tf.keras.optimizers.legacy.SGD)
    again = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(opt), use_legacy_optimizer=True)
    assert isinstance(again, kflip.FlipLSTM)
    np.testing.assert_array_equal(again.lstm_weights.kernel, opt.lstm_weights.kernel)


def _batches(digits, n, start=0):
    for i in range(start, start + n):
        j = (i * 64) % (len(digits.x_train) - 64)
        yield digits.x_train[j: j + 64], digits.y_train[j: j + 64]


def _state(model, opt):
    slots = [opt.get_slot(v, s).numpy() for v in kflip.binary_variables(model) for s in ("h0", "c0", "v")]
    return [v.numpy() for v in model.variables], slots, opt.flip_counts(), int(opt.iterations)


def _assert_same_state(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(x, y)
    assert list(a[2].values()) == list(b[2].values()) and a[3] == b[3]


def test_checkpoint_resume_continues_exactly(digits, tmp_path):
    def fresh():
        model = small_mlp(hidden=(32, 32))
        opt = kflip.FlipLSTM(kflip.bop_weights(1e-4, 0.05))
        model.compile(opt, LOSS, jit_compile=True)
        return model, opt

    model, opt = fresh()
    for x, y in _batches(digits, 8):
        model.train_on_batch(x, y)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    path = ckpt.save(str(tmp_path / "ckpt"))
    for x, y in _batches(digits, 8, start=8):
        model.train_on_batch(x, y)
    uninterrupted = _state(model, opt)
    assert sum(uninterrupted[2].values()) > 0

    model2, opt2 = fresh()
    tf.train.Checkpoint(model=model2, optimizer=opt2).restore(path).assert_existing_objects_matched()
    for x, y in _batches(digits, 8, start=8):
        model2.train_on_batch(x, y)
    _assert_same_state(uninterrupted, _state(model2, opt2))


def test_model_save_and_load_resumes_exactly(digits, tmp_path):
    model = small_mlp(hidden=(32,))
    model.compile(kflip.FlipLSTM(kflip.bop_weights(1e-4, 0.05)), LOSS, jit_compile=True)
    for x, y in _batches(digits, 6):
        model.train_on_batch(x, y)
    model.save(str(tmp_path / "model.h5"))  # the Keras format that keeps legacy-optimizer slots
    for x, y in _batches(digits, 6, start=6):
        model.train_on_batch(x, y)
    uninterrupted = _state(model, model.optimizer)

    loaded = tf.keras.models.load_model(str(tmp_path / "model.h5"))
    assert isinstance(loaded.optimizer, kflip.FlipLSTM)
    loaded.compile(loaded.optimizer, LOSS, jit_compile=True)  # same XLA program as before
    for x, y in _batches(digits, 6, start=6):
        loaded.train_on_batch(x, y)
    _assert_same_state(uninterrupted, _state(loaded, loaded.optimizer))


def test_model_without_binary_variables_warns_and_trains_floats(digits):
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(10, activation="softmax")])
    opt = kflip.FlipLSTM()
    model.compile(opt, LOSS)
    before = model.layers[-1].kernel.numpy().copy()
    with pytest.warns(UserWarning, match="no binary variables"):
        model.train_on_batch(digits.x_train[:64], digits.y_train[:64])
    assert not np.array_equal(before, model.layers[-1].kernel.numpy())
    assert int(opt.iterations) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(output="latent"), "output"),
        (dict(max_flip_rate=0.0), "max_flip_rate"),
        (dict(max_flip_rate=1.5), "max_flip_rate"),
        (dict(flip_threshold=-1.0), "flip_threshold"),
        (dict(flip_threshold=float("nan")), "flip_threshold"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(latent_clip=0.0), "latent_clip"),
        (dict(float_optimizer="no-such-optimizer"), "float_optimizer"),
        (dict(float_optimizer=42), "float_optimizer"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kflip.FlipLSTM(**kwargs)


def test_nan_gradients_never_corrupt_binary_weights():
    var = lq.quantized_variable.QuantizedVariable.from_variable(
        tf.Variable(np.sign(np.random.RandomState(0).randn(4, 3)).astype(np.float32)),
        quantizer=lq.quantizers.NoOp(precision=1), precision=1)
    opt = kflip.FlipLSTM(kflip.bop_weights(0.0, 0.5))
    grad = np.full((4, 3), 1.0, np.float32) * var.numpy()  # every weight wants to flip
    grad[0, :] = np.nan
    grad[1, 0] = np.inf
    before = var.numpy().copy()
    opt.apply_gradients([(tf.constant(grad), var)])  # the whole tensor skips this step
    np.testing.assert_array_equal(var.numpy(), before)
    for s in ("h0", "c0", "v"):
        assert np.all(opt.get_slot(var, s).numpy() == 0)
    assert opt.flip_counts() == {var.name.split(":")[0]: 0}
    opt.apply_gradients([(tf.constant(before), var)])
    np.testing.assert_array_equal(var.numpy(), -before)  # the next finite step flips all
    assert np.all(np.abs(var.numpy()) == 1)


def test_wrong_gradient_shape_or_dtype_is_a_clear_error():
    var = lq.quantized_variable.QuantizedVariable.from_variable(
        tf.Variable(tf.ones([4, 3])), quantizer=lq.quantizers.NoOp(precision=1), precision=1)
    opt = kflip.FlipLSTM()
    with pytest.raises(ValueError, match="shape"):
        opt.apply_gradients([(tf.ones([3, 4]), var)])
    with pytest.raises(ValueError, match="dtype"):
        opt.apply_gradients([(tf.ones([4, 3], tf.int32), var)])
    np.testing.assert_array_equal(var.numpy(), np.ones([4, 3]))  # untouched


def test_max_flip_rate_caps_flips_per_step(digits):
    model = small_mlp(hidden=(64,))
    opt = kflip.FlipLSTM(kflip.bop_weights(0.0, 0.5), max_flip_rate=0.01)
    model.compile(opt, LOSS, jit_compile=True)
    sizes = None
    last = None
    for x, y in _batches(digits, 5):
        model.train_on_batch(x, y)
        counts = opt.flip_counts()
        sizes = opt.binary_sizes()
        if last is not None:
            for name, c in counts.items():
                assert 0 < c - last[name] <= max(1, int(0.01 * sizes[name]))
        last = counts


def test_flip_threshold_schedule(digits):
    model = small_mlp(hidden=(32,))
    sched = tf.keras.optimizers.schedules.PiecewiseConstantDecay([3], [1e9, 0.0])
    opt = kflip.FlipLSTM(kflip.bop_weights(0.0, 0.5), flip_threshold=sched)
    model.compile(opt, LOSS, jit_compile=True)
    totals = []
    for x, y in _batches(digits, 6):
        model.train_on_batch(x, y)
        totals.append(sum(opt.flip_counts().values()))
    assert totals[3] == 0 and totals[5] > 0


def test_flip_rate_callback_reports_exact_rates(digits):
    model = small_mlp(hidden=(32,))
    opt = kflip.FlipLSTM(kflip.bop_weights(1e-5, 0.05))
    model.compile(opt, LOSS, jit_compile=True)
    rate = kflip.FlipRate(every_n_batches=5)
    hist = model.fit(digits.x_train, digits.y_train, batch_size=64, epochs=2, verbose=0, callbacks=[rate])
    steps_per_epoch = int(np.ceil(len(digits.x_train) / 64))
    sizes = opt.binary_sizes(model)
    for name, total in opt.flip_counts(model).items():
        logged = hist.history[f"flip_rate/{name}"]
        assert len(logged) == 2
        assert sum(logged) * steps_per_epoch * sizes[name] == pytest.approx(total)
    assert sum(opt.flip_counts().values()) > 0
    assert len(rate.history) == 2 * (steps_per_epoch // 5) and "flip_rate" in rate.history[0]
    with pytest.raises(ValueError, match="every_n_batches"):
        kflip.FlipRate(every_n_batches=0)


def test_gradient_output_mode_trains_latent_weights(digits):
    model = small_mlp(hidden=(32,))
    kernels = kflip.binary_variables(model)
    for k in kernels:  # start from small latent floats, as STE training does
        k.assign(k * 0.05)
    opt = kflip.FlipLSTM(kflip.bop_weights(1e-6, 0.1, normalized=True), output="gradient",
                         learning_rate=0.01)
    model.compile(opt, LOSS, metrics=["accuracy"], jit_compile=True)
    hist = model.fit(digits.x_train, digits.y_train, batch_size=64, epochs=3, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    latent = np.concatenate([k.numpy().ravel() for k in kernels])
    assert np.all(np.abs(latent) <= 1.0) and not np.all(np.abs(latent) == 1.0)
    assert sum(opt.flip_counts().values()) > 0  # sign changes are counted as flips


def test_gradient_mode_rejects_noop_quantizer(digits):
    model = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten(),
                                 lq.layers.QuantDense(10, kernel_quantizer=lq.quantizers.NoOp(precision=1))])
    model.compile(kflip.FlipLSTM(output="gradient"), LOSS)
    with pytest.raises(ValueError, match="ste_sign"):
        model.train_on_batch(digits.x_train[:8], digits.y_train[:8])


def _python(code):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_selects_keras2_and_refuses_keras3_when_too_late():
    ok = _python("import kflip, tensorflow as tf; print(tf.keras.Model.__module__)")
    assert ok.returncode == 0 and ok.stdout.strip().startswith("tf_keras"), ok.stderr
    late = _python("import tensorflow as tf; tf.keras.layers; import kflip")
    assert late.returncode != 0
    assert "ImportError" in late.stderr and "TF_USE_LEGACY_KERAS=1" in late.stderr


def test_no_warning_noise_on_normal_use(digits):
    model = small_mlp()
    model.compile(kflip.FlipLSTM(), LOSS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.train_on_batch(digits.x_train[:64], digits.y_train[:64])


def _first_step_traces(opt, digits, metrics=None):
    model = small_mlp(hidden=(16, 16))  # binary kernels of shapes (64, 16), (16, 16), (16, 10)
    model.compile(opt, LOSS, metrics=metrics, jit_compile=True)
    traces, train_step = [], model.train_step

    def counted(data):
        traces.append(1)  # runs once per trace of the train function
        return train_step(data)

    model.train_step = counted
    x, y = next(_batches(digits, 1))
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    return len(traces)


def test_first_train_step_is_traced_once(digits):
    """FlipLSTM creates its variables (and Adam's) unlifted, so the step is not re-traced;
    Bop's slot creation makes Keras trace the step twice. The rule is traced once per rank
    of kernel (the MLP's three share one trace), or once per shape where it reads sizes."""
    opt = kflip.FlipLSTM()
    assert _first_step_traces(opt, digits) == 1
    assert opt._step_fn.experimental_get_tracing_count() == 1
    opt = kflip.FlipLSTM(output="gradient")  # the latent-weight ablation, too
    assert _first_step_traces(opt, digits) == 1
    assert opt._step_fn.experimental_get_tracing_count() == 1
    opt = kflip.FlipLSTM(max_flip_rate=0.5)  # reads each kernel's size
    assert _first_step_traces(opt, digits) == 1
    assert opt._step_fn.experimental_get_tracing_count() == 3
    bop = lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, lq.optimizers.Bop()),
        default_optimizer=tf.keras.optimizers.legacy.Adam(0.01))
    assert _first_step_traces(bop, digits) == 2
    opt = kflip.FlipLSTM()  # metrics create variables in the first trace: traced twice,
    assert _first_step_traces(opt, digits, metrics=["accuracy"]) == 2
    assert opt._step_fn.experimental_get_tracing_count() == 1  # but the rule once
    names = [v.name for v in opt.weights]
    assert "FlipLSTM/iter:0" in names and "Adam/iter:0" in names and len(set(names)) == len(names)
