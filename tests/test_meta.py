"""Meta-training (kflip.meta, kflip.meta_tasks): inner loop, ES, determinism, CLI."""

import argparse
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import kflip
from kflip import cell as cell_lib
from kflip import meta
from kflip.adam import Adam
from kflip.meta import nets, tasks, unroll
from kflip.rule import FlipRule

TINY = dict(
    iterations=2,
    pairs=2,
    horizon=20,
    families=("mlp-32",),
    family_weights=(1.0,),
    datasets=("digits", "teacher"),
    val_tasks=2,
    eval_every=1,
    seed=3,
)


# ---- tasks and the functional networks ---------------------------------------------
def test_make_task_is_deterministic_and_binary():
    a = tasks.make_task("mlp-64-64", "digits-proj", 7, horizon=20)
    b = tasks.make_task("mlp-64-64", "digits-proj", 7, horizon=20)
    c = tasks.make_task("mlp-64-64", "digits-proj", 8, horizon=20)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.batches, b.batches)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (tasks.N_TRAIN, 64)
    assert a.batches.shape == (20, tasks.BATCH_SIZE)
    assert all(np.all(np.abs(k) == 1) for k in a.kernels)
    assert [k.shape for k in a.kernels] == [(64, 64), (64, 64), (64, 10)]
    # teacher labels use every class often enough to be a real task
    t = tasks.make_task("mlp-32", "teacher", 1, horizon=1)
    assert len(np.unique(t.y_train)) >= 5


def test_make_task_augments_digits_beyond_their_size():
    t = tasks.make_task("mlp-32", "digits", 2, horizon=200, n_train=4096)
    assert t.x_train.shape == (4096, 64) and t.x_held_out.shape == (512, 64)
    assert t.batches.max() == 4095  # the batch order covers the larger set
    # held-out examples are real digits images, never augmented
    real, _ = tasks._digits()
    assert all((np.abs(real - x).sum(1) == 0).any() for x in t.x_held_out[:20])
    assert np.all(np.abs(t.x_train) <= 1.0)
    with pytest.raises(ValueError, match="n_train"):
        tasks.make_task("mlp-32", "digits", 2, horizon=1, n_train=10)


def test_mnist_sized_families_render_digits_at_28x28():
    t = tasks.make_task("mlp784-256-256", "digits", 5, horizon=30, n_train=2048)
    assert t.x_train.shape == (2048, 784) and t.x_held_out.shape == (512, 784)
    assert [k.shape for k in t.kernels] == [(784, 256), (256, 256), (256, 10)]
    assert np.all(np.abs(t.x_train) <= 1.0)
    img = t.x_held_out.reshape(-1, 28, 28)
    # the upscaled 24x24 digit sits on a -1 background: two borders rows always blank
    blank = (img == -1.0).all(axis=2)
    assert (blank.sum(1) >= 4).all()
    # every dataset variant and the teacher build at 784 inputs, deterministically
    for ds in tasks.DATASETS:
        a = tasks.make_task("mlp784-256-256", ds, 9, horizon=2, n_train=256)
        b = tasks.make_task("mlp784-256-256", ds, 9, horizon=2, n_train=256)
        assert a.x_train.shape == (256, 784)
        np.testing.assert_array_equal(a.x_train, b.x_train)


def test_functional_mlp_matches_keras_mlp():
    """The inner network is the same function as kflip.models.mlp in training mode."""
    task = tasks.make_task("mlp-32", "digits", 0, horizon=1)
    model = kflip.models.mlp(input_shape=(64,), num_classes=10, hidden=(32,))
    dense = [layer for layer in model.layers if hasattr(layer, "kernel")]
    for layer, k in zip(dense, task.kernels):
        layer.kernel.assign(k)
    x = task.x_train[:64]
    want = model(x, training=True).numpy()
    fam = tasks.FAMILIES["mlp-32"]
    offsets = [tf.zeros(s) for s in tasks.offset_shapes(fam)]
    got = tf.nn.softmax(tasks.forward(fam, task.kernels, offsets, tf.constant(x))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_unroll_equals_keras_training_with_flip_lstm():
    """The compiled inner loop trains like model.fit with FlipLSTM (same flips)."""
    w = kflip.bop_weights(0.05, 0.1, normalized=True, scale=1.0)
    steps = 8
    task = tasks.make_task("mlp-32", "digits", 3, horizon=steps)
    fn = unroll.get_unroll("mlp-32", 1, w.beta, w.eps)
    res = fn(tf.constant(unroll.flatten(w), tf.float32), *task.unroll_args())
    tf.keras.backend.clear_session()
    model = kflip.models.mlp(input_shape=(64,), num_classes=10, hidden=(32,))
    dense = [layer for layer in model.layers if hasattr(layer, "kernel")]
    for layer, k in zip(dense, task.kernels):
        layer.kernel.assign(k)
    opt = kflip.FlipLSTM(w, tf.keras.optimizers.legacy.Adam(0.01))
    model.compile(opt, "sparse_categorical_crossentropy", jit_compile=True)
    for idx in task.batches:
        model.train_on_batch(task.x_train[idx], task.y_train[idx])
    assert sum(opt.flip_counts(model).values()) > 0  # the comparison is not vacuous
    for layer, got in zip(dense, res.kernels):
        np.testing.assert_array_equal(layer.kernel.numpy(), got.numpy())


def test_ste_sign_forward_and_gradient():
    x = tf.constant([-2.0, -0.5, 0.0, 0.7, 1.5])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tasks.ste_sign(x)
    np.testing.assert_array_equal(y.numpy(), [-1, -1, 1, 1, 1])
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [0, 1, 1, 1, 0])


H = TINY["horizon"]  # one horizon for every MLP test: XLA compiles the unroll once


def _eager_reference(w, task):
    """The inner loop written eagerly, one tensor at a time (no XLA, no while):
    kflip.rule.FlipRule on each kernel, kflip.adam.Adam(0.01) on each offset."""
    fam = tasks.FAMILIES[task.family]
    rule = FlipRule.from_weights(w)
    adam = Adam(0.01)
    kernels = [tf.constant(k) for k in task.kernels]
    offsets = [tf.zeros(s) for s in tasks.offset_shapes(fam)]
    flip_states = [rule.init(k) for k in kernels]
    adam_states = [adam.init(o) for o in offsets]
    logs = []
    for idx in task.batches:
        with tf.GradientTape() as tape:
            tape.watch(kernels + offsets)
            loss = tasks.xent(
                tasks.forward(fam, kernels, offsets, task.x_train[idx]), task.y_train[idx]
            )
        grads = tape.gradient(loss, kernels + offsets)
        logs.append(np.log(float(loss)))
        for j in range(len(kernels)):
            signs, flip_states[j] = rule.update(grads[j], flip_states[j], kernels[j])
            kernels[j] = kernels[j] * signs
            g = grads[len(kernels) + j]
            offsets[j], adam_states[j] = adam.update(g, adam_states[j], offsets[j])
    return kernels, float(np.mean(logs)), sum(int(s.flips) for s in flip_states)


def test_compiled_unroll_equals_eager_flip_step_reference():
    """The XLA inner loop applies exactly FlipLSTM's rule to every kernel."""
    w = kflip.bop_weights(0.05, 0.1, normalized=True, scale=1.0)
    task = tasks.make_task("mlp-32", "digits", 5, horizon=H)
    fn = unroll.get_unroll("mlp-32", 1, w.beta, w.eps)
    res = fn(tf.constant(unroll.flatten(w), tf.float32), *task.unroll_args())
    kernels, mean_log, flips = _eager_reference(w, task)
    assert flips > 0  # the comparison is not vacuous
    for got, want in zip(res.kernels, kernels):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_allclose(float(res.mean_log_train_loss), mean_log, rtol=1e-4, atol=1e-5)


def test_unroll_is_xla_compiled_and_learns_with_binary_kernels():
    w = kflip.bop_weights(0.05, 0.1, normalized=True, scale=1.0)
    task = tasks.make_task("mlp-32", "digits", 1, horizon=H)
    fn = unroll.get_unroll("mlp-32", 1, w.beta, w.eps)
    args = (tf.constant(unroll.flatten(w), tf.float32),) + task.unroll_args()
    hlo = fn.experimental_get_compiler_ir(*args)(stage="hlo")
    assert "while" in hlo  # the whole unroll is one XLA computation with a loop
    res = fn(*args)
    assert all(np.all(np.abs(k.numpy()) == 1) for k in res.kernels)
    assert 0 < float(res.flip_fraction) < 0.5
    # a rule that never flips cannot train the binary kernels: worse on every count
    frozen = kflip.bop_weights(1e6, 0.1, normalized=True, scale=1.0)
    res0 = fn(tf.constant(unroll.flatten(frozen), tf.float32), *args[1:])
    assert float(res0.flip_fraction) == 0.0
    for k0, k in zip(res0.kernels, task.kernels):
        np.testing.assert_array_equal(k0.numpy(), k)
    assert float(res.meta_loss) < float(res0.meta_loss) - 0.1
    assert float(res.held_out_accuracy) > float(res0.held_out_accuracy) + 0.05


@pytest.mark.skipif(not os.environ.get("KFLIP_SLOW_TESTS"), reason="set KFLIP_SLOW_TESTS=1 (XLA compile of the CNN)")
def test_cnn_family_runs():
    w = kflip.bop_weights(0.05, 0.1, normalized=True, scale=1.0)
    ev = unroll.Evaluator(1, w.beta, w.eps)
    r = ev(unroll.flatten(w), tasks.make_task("cnn-8-8", "digits", 0, horizon=H))
    assert np.isfinite(r["meta_loss"]) and r["flip_fraction"] > 0


# ---- flat vectors, masks, ES maths --------------------------------------------------
def test_flatten_roundtrip_and_cell_from_vector():
    w = kflip.bop_weights(0.1, 1e-3, normalized=True, scale=1.0, hidden_size=2)
    vec = unroll.flatten(w)
    assert vec.shape == (unroll.num_params(2),)
    back = unroll.unflatten(vec, 2, like=w)
    for name in ("kernel", "recurrent", "bias", "out_kernel"):
        np.testing.assert_array_equal(getattr(back, name), getattr(w, name))
    assert back.out_bias == pytest.approx(w.out_bias)
    cell = unroll.cell_from_vector(tf.constant(vec, tf.float32), 2)
    ref = cell_lib.CellTensors.from_weights(w)
    assert cell.tensor_kernel is None and ref.tensor_kernel is None  # unconditioned
    for a, b in zip(cell[:5], ref[:5]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="vec"):
        unroll.unflatten(vec[:-1], 2)


def test_es_gradient_points_along_true_gradient():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(10)
    x = np.zeros(10)
    f = lambda v: float(np.sum((v - a) ** 2))  # noqa: E731
    eps = rng.standard_normal((200, 10))
    sigma = 0.1
    g = meta.es_gradient([f(x + sigma * e) for e in eps], [f(x - sigma * e) for e in eps], eps, sigma)
    true = 2 * (x - a)
    cos = g @ true / np.linalg.norm(g) / np.linalg.norm(true)
    assert cos > 0.9


def test_gradient_agreement_compares_independent_draws():
    tiny = meta.MetaConfig(pairs=2, horizon=5, train_examples=64, families=("mlp-32",))
    cos = meta.gradient_agreement(tiny, draws=3, workers=1)
    np.testing.assert_allclose(np.diag(cos), 1.0)
    np.testing.assert_allclose(cos, cos.T)
    off = cos[~np.eye(3, dtype=bool)]
    assert np.all(np.abs(off) <= 1 + 1e-12) and np.all(off < 1 - 1e-6)  # the draws differ
    with pytest.raises(ValueError, match="`draws`"):
        meta.gradient_agreement(tiny, draws=1, workers=1)


def test_centered_ranks():
    r = meta.centered_ranks([3.0, -1.0, 10.0, 0.0])
    np.testing.assert_allclose(r, [1 / 6, -0.5, 0.5, -1 / 6])


def test_mask_freezes_raw_feature_and_scales():
    cfg = meta.MetaConfig(hidden_size=1, train_raw_feature=False, train_gate_inputs=True)
    mask = meta.trainable_mask(cfg)
    assert mask.shape == (unroll.num_params(1),)
    np.testing.assert_array_equal(mask[:4], 0)  # kernel row of theta_grad
    assert mask[4:].all()
    assert meta.trainable_mask(
        meta.MetaConfig(train_raw_feature=True, train_gate_inputs=True)
    ).all()
    s = meta.coordinate_scales(np.array([0.0, -2.0, 0.01]))
    np.testing.assert_allclose(s, [1.0, 2.0, 0.01])
    s = meta.coordinate_scales(np.array([0.0, -2.0, 0.01]), zero_scale=1e-7)
    np.testing.assert_allclose(s, [1e-7, 2.0, 0.01])


def test_mask_freezes_gate_inputs_but_not_the_candidate():
    h = 2
    cfg = meta.MetaConfig(hidden_size=h, train_raw_feature=True, train_gate_inputs=False)
    w = unroll.unflatten(meta.trainable_mask(cfg), h)
    cand = cell_lib.GATES.index("candidate")
    expected = np.zeros((len(cell_lib.FEATURES), 4 * h))
    expected[:, cand * h : (cand + 1) * h] = 1.0
    np.testing.assert_array_equal(w.kernel, expected)
    # everything that is not an input weight stays trainable
    assert w.recurrent.all() and w.bias.all() and w.out_kernel.all() and w.out_bias == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pairs=0), "pairs"),
        (dict(sigma=-1.0), "sigma"),
        (dict(families=("nope",)), "families"),
        (dict(family_weights=(1.0, 2.0, 3.0)), "family_weights"),
        (dict(zero_scale=0.0), "zero_scale"),
        (dict(datasets=("mnist",)), "datasets"),
        (dict(init="no/such/file"), "init"),
        (dict(init_gamma=1.5), "init_gamma"),
        (dict(horizon=0), "horizon"),
        (dict(train_examples=8), "train_examples"),
        (dict(min_horizon=5000), "min_horizon"),
        (dict(min_horizon=-1), "min_horizon"),
        (dict(baseline="adam"), "baseline"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        meta.MetaConfig(**kwargs)


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="horizon"):
        tasks.make_task("mlp-32", "digits", 0, horizon=0)
    with pytest.raises(ValueError, match="dataset"):
        tasks.make_task("mlp-32", "mnist", 0, horizon=1)
    with pytest.raises(ValueError, match="resume"):
        meta.meta_train(meta.MetaConfig(**TINY), resume=True, workers=1)
    with pytest.raises(ValueError, match="workers"):
        meta.meta_train(meta.MetaConfig(**TINY), workers=0)


def test_tasks_never_overlap_validation():
    cfg = meta.MetaConfig()
    val = {k[2] for k in meta.validation_tasks(cfg)}
    train = {k[2] for it in range(20) for k in meta.iteration_draws(cfg, it, 5)[1]}
    assert val and train and not (val & train)


# ---- the task distribution: lengths, architectures, Bop-relative loss ------------------
def test_task_lengths_are_log_uniform_and_fixed_per_task():
    cfg = meta.MetaConfig(min_horizon=100, horizon=10000)
    keys = [("mlp-32", "digits", s) for s in range(400)]
    h = np.array([meta.config.task_horizon(cfg, k) for k in keys])
    assert h.min() >= 100 and h.max() <= 10000
    assert h.tolist() == [meta.config.task_horizon(cfg, k) for k in keys]
    # log-uniform: a quarter of the tasks in each quarter of the log range
    quarters = np.histogram(np.log10(h), bins=[2, 2.5, 3, 3.5, 4])[0] / len(h)
    assert np.all(np.abs(quarters - 0.25) < 0.08), quarters
    assert meta.config.task_horizon(meta.MetaConfig(), keys[0]) == 4000  # fixed by default


def test_bucketed_unroll_trains_the_same_flips():
    w = cell_lib.load_weights()
    task = tasks.make_task("mlp-32", "digits", 5, horizon=37)
    assert tasks.horizon_bucket(37) == 64
    fn = unroll.get_unroll("mlp-32", w.hidden_size, w.beta, w.eps)
    fn_bucketed = unroll.get_unroll("mlp-32", w.hidden_size, w.beta, w.eps, bucketed=True)
    vec = tf.constant(unroll.flatten(w), tf.float32)
    exact, padded = fn(vec, *task.unroll_args()), fn_bucketed(vec, *task.unroll_args(bucketed=True))
    for a, b in zip(exact.kernels, padded.kernels):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(float(padded.meta_loss), float(exact.meta_loss), rtol=1e-6)
    assert float(padded.flip_fraction) == float(exact.flip_fraction)


@pytest.mark.parametrize("family", ["res-8", "cnn28-16-32-32", "res28-16-32", "mlp784-128"])
def test_new_families_build_and_keep_kernels_binary(family):
    fam = tasks.FAMILIES[family]
    task = tasks.make_task(family, "digits", 0, horizon=2, n_train=64)
    assert task.x_train.shape[1] == fam.inputs
    offsets = [tf.zeros(s) for s in tasks.offset_shapes(fam)]
    kernels = [tf.constant(k) for k in task.kernels]
    with tf.GradientTape() as tape:
        tape.watch(kernels)
        loss = tasks.xent(tasks.forward(fam, kernels, offsets, task.x_train[:8]), task.y_train[:8])
    grads = tape.gradient(loss, kernels)
    assert np.isfinite(float(loss))
    assert all(g is not None and g.shape == k.shape for g, k in zip(grads, kernels))
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)  # every kernel is trained


def test_res_family_is_a_residual_net():
    fam = tasks.FAMILIES["res-8"]
    # stem, one residual block, the dense head; the block's output adds its input
    assert fam.kernel_shapes() == [(3, 3, 1, 16), (3, 3, 16, 16), (16, 10)]
    x = tf.random.stateless_uniform([16, 64], [1, 2], -1, 1)
    offsets = [tf.zeros(s) for s in tasks.offset_shapes(fam)]
    k = [tf.sign(tf.random.stateless_normal(s, [3, i])) for i, s in enumerate(fam.kernel_shapes())]
    # a block kernel of 0 leaves only the shortcut: same logits as a net without the block
    zero_block = [k[0], tf.zeros_like(k[1]), k[2]]
    stem = nets._batch_norm(nets._conv3x3(tf.reshape(x, [-1, 8, 8, 1]), k[0], "SAME"),
                                  offsets[0], [0, 1, 2])
    head = nets._mlp([k[2]], [offsets[2]], tasks.ste_sign(tf.reduce_mean(stem, [1, 2])))
    got = tasks.forward(fam, zero_block, offsets, x)
    np.testing.assert_allclose(got.numpy(), head.numpy(), atol=1e-5)


def test_bop_relative_meta_loss_is_zero_for_bop_itself():
    from kflip.meta import loop

    cfg = meta.MetaConfig(**dict(TINY, baseline="bop", min_horizon=5))
    base = meta.config.baseline_weights(cfg)
    loop._init_worker(cfg.hidden_size, base.beta, base.eps)
    vec = unroll.flatten(base).astype(np.float32)
    key = ("mlp-32", "digits", 4)
    h = meta.config.task_horizon(cfg, key)
    assert 5 <= h <= 20
    base_loss = loop._evaluate(loop.Job(vec, key, h, cfg.train_examples, True))["meta_loss"]
    job = loop.Job(vec, key, h, cfg.train_examples, True, base_loss)
    r = loop._evaluate(job)
    assert r["meta_loss"] == 0.0 and r["raw_meta_loss"] == base_loss and np.isfinite(base_loss)
    other = loop._evaluate(job._replace(vec=unroll.flatten(cell_lib.load_weights()).astype(np.float32)))
    assert other["meta_loss"] == other["raw_meta_loss"] - base_loss


# ---- meta-training: determinism, resume, output ---------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("meta")
    w = meta.meta_train(meta.MetaConfig(**TINY), out=str(d / "w.npz"), log=str(d / "log.jsonl"), workers=1)
    return d, w


def test_meta_train_is_deterministic(tiny_run):
    _, w1 = tiny_run
    w2 = meta.meta_train(meta.MetaConfig(**TINY), workers=1)
    np.testing.assert_allclose(unroll.flatten(w1), unroll.flatten(w2), atol=1e-6)
    assert w1.metadata["meta_loss_curve"] == w2.metadata["meta_loss_curve"]


def test_meta_train_output_log_and_flip_lstm_loads_it(tiny_run):
    d, w = tiny_run
    m = json.loads((d / "w.json").read_text())
    for key in ("config", "seed", "data", "meta_training_time_s", "meta_loss_curve", "kflip_version"):
        assert key in m
    assert m["kflip_version"] == kflip.__version__
    assert len(m["meta_loss_curve"]) == TINY["iterations"]
    assert "mnist" not in json.dumps(m["data"]["datasets"]).lower()
    lines = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2]
    # the output is the best validated mean (iteration 0 = init included)
    assert m["best_val_meta_loss"] == min(e["val_meta_loss"] for e in m["val_curve"])
    # the frozen coordinates (by default: the gates' input weights) kept the init's
    # values, the trainable ones moved
    cfg = meta.MetaConfig(**TINY)
    mask = meta.trainable_mask(cfg)
    assert 0 < mask.sum() < mask.size
    init, got = unroll.flatten(meta.initial_weights(cfg)), unroll.flatten(w)
    np.testing.assert_array_equal(got[mask == 0], init[mask == 0])
    assert not np.array_equal(got[mask == 1], init[mask == 1])
    opt = kflip.FlipLSTM(weights=str(d / "w.npz"))
    np.testing.assert_allclose(opt.lstm_weights.kernel, w.kernel)


def test_resume_continues_exactly(tiny_run, tmp_path):
    _, full = tiny_run
    ckpt = str(tmp_path / "ckpt.json")
    cfg1 = meta.MetaConfig(**dict(TINY, iterations=1))
    meta.meta_train(cfg1, checkpoint=ckpt, checkpoint_every=1, workers=1)
    with pytest.raises(ValueError, match="different config"):
        meta.meta_train(meta.MetaConfig(**dict(TINY, sigma=0.3)), checkpoint=ckpt, resume=True, workers=1)
    resumed = meta.meta_train(meta.MetaConfig(**TINY), checkpoint=ckpt, resume=True, workers=1)
    np.testing.assert_allclose(unroll.flatten(resumed), unroll.flatten(full), atol=1e-6)
    assert resumed.metadata["val_curve"] == full.metadata["val_curve"]


@pytest.mark.skipif(not os.environ.get("KFLIP_SLOW_TESTS"), reason="set KFLIP_SLOW_TESTS=1 (spawns 2 TF processes)")
def test_cli_two_workers_match_in_process(tiny_run, tmp_path):
    """A pool of 2 worker processes gives exactly the in-process result."""
    _, w_inproc = tiny_run
    parser = meta.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "cli.npz"
    args = parser.parse_args(
        ["--out", str(out), "--iterations", "2", "--pairs", "2", "--horizon", "40",
         "--families", "mlp-32", "--family-weights", "1", "--datasets", "digits,teacher",
         "--val-tasks", "2", "--eval-every", "1", "--seed", "3", "--workers", "2", "--quiet"]
    )
    assert meta.run(args) == 0
    w = kflip.LSTMWeights.load(str(out))
    np.testing.assert_allclose(unroll.flatten(w), unroll.flatten(w_inproc), atol=1e-6)
    assert os.path.exists(str(tmp_path / "cli.log.jsonl"))
    assert os.path.exists(str(tmp_path / "cli.ckpt.json"))


def test_cli_add_arguments_and_run(tiny_run, tmp_path):
    """`kflip meta-train` = add_arguments + run: same result as the Python API."""
    _, w_api = tiny_run
    parser = meta.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "cli.npz"
    args = parser.parse_args(
        ["--out", str(out), "--iterations", "2", "--pairs", "2", "--horizon", str(H),
         "--families", "mlp-32", "--family-weights", "1", "--datasets", "digits,teacher",
         "--val-tasks", "2", "--eval-every", "1", "--seed", "3", "--workers", "1", "--quiet"]
    )
    assert meta.run(args) == 0
    w = kflip.LSTMWeights.load(str(out))
    np.testing.assert_allclose(unroll.flatten(w), unroll.flatten(w_api), atol=1e-6)
    lines = (tmp_path / "cli.log.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads((tmp_path / "cli.ckpt.json").read_text())["iteration"] == 2


class _StandStill:
    """A do-nothing gradient estimator: one point per iteration, zero gradient."""

    def __init__(self):
        self.calls = []

    def propose(self, z, iteration):
        self.calls.append(iteration)
        return meta.Proposal([z], [("mlp-32", "digits", 2 * iteration)], None)

    def gradient(self, proposal, losses):
        assert len(losses) == len(proposal.points) == 1
        return np.zeros_like(proposal.points[0])


def test_another_estimator_plugs_into_the_loop_unchanged():
    """The outer loop only talks to the GradientEstimator protocol."""
    est = _StandStill()
    cfg = meta.MetaConfig(**TINY)
    w = meta.meta_train(cfg, workers=1, estimator=est)
    assert est.calls == list(range(cfg.iterations))
    # zero gradients leave Adam at z = 0: the output is the initial rule
    np.testing.assert_array_equal(unroll.flatten(w), unroll.flatten(meta.initial_weights(cfg)))
    assert w.metadata["iterations_done"] == cfg.iterations


def test_checkpoint_is_plain_json_of_the_typed_state(tiny_run, tmp_path):
    ckpt = tmp_path / "ckpt.json"
    meta.meta_train(meta.MetaConfig(**TINY), checkpoint=str(ckpt), workers=1)
    raw = json.loads(ckpt.read_text())  # plain JSON: no pickle anywhere
    state = meta.MetaState.from_json(raw)
    assert state.iteration == TINY["iterations"] and state.adam.count == TINY["iterations"]
    assert state.z.dtype == np.float64 and state.z.shape == state.adam.mu.shape
    again = meta.MetaState.from_json(json.loads(json.dumps(state.to_json())))
    np.testing.assert_array_equal(again.z, state.z)  # float64 survives JSON exactly
    assert again.val_curve == state.val_curve and again.best == state.best
    ckpt.write_text("{not json")
    with pytest.raises(ValueError, match="checkpoint"):
        meta.meta_train(meta.MetaConfig(**TINY), checkpoint=str(ckpt), resume=True, workers=1)


def test_every_config_field_is_a_cli_flag_with_its_default():
    import dataclasses

    parser = meta.add_arguments(argparse.ArgumentParser())
    assert meta.config_from_args(parser.parse_args([])) == meta.MetaConfig()
    flags = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(meta.MetaConfig):
        assert f.name in flags and f.metadata["help"] in (flags[f.name].help or "").replace("%%", "%")
        assert f.metadata["help"] in meta.MetaConfig.__doc__  # the docstring says the same
    args = parser.parse_args(["--families", "mlp-32,cnn-8-8", "--family-weights", "1,3",
                              "--no-train-raw-feature", "--lr", "0.2"])
    cfg = meta.config_from_args(args)
    assert cfg.families == ("mlp-32", "cnn-8-8") and cfg.family_weights == (1.0, 3.0)
    assert cfg.train_raw_feature is False and cfg.learning_rate == 0.2


# ---- looking at a rule -----------------------------------------------------------------
def test_decision_map_of_bop_weights_is_bops_threshold_rule():
    thr, gamma, s = 1e-6, 1e-3, 1e-3  # raw-gradient Bop, gradients of rms 1e-3
    w = kflip.bop_weights(thr, gamma)
    feats = np.linspace(-4, 4, 41)
    cells = np.linspace(-5, 5, 41) * 0.01 * thr  # c = scale * theta * m
    y = meta.decision_map(w, feats, cells, grad_std=s)
    X, C = np.meshgrid(feats, cells)
    m_new = ((1 - gamma) * C + gamma * 0.01 * X * s) / 0.01  # Bop momentum, weight frame
    margin = np.abs(m_new - thr) > 0.05 * thr  # away from the boundary (tanh, float32)
    np.testing.assert_array_equal((y < 0)[margin], (m_new > thr)[margin])


def test_flip_probability_rises_with_the_evidence_for_flipping():
    w = kflip.bop_weights(1e-6, 1e-3)
    p = meta.flip_probability(w, [-0.3, 0.0, 0.3], steps=300, trials=200, grad_std=1e-3)
    assert p[0] <= p[1] <= p[2] and p[2] > p[0]


def test_shipped_default_weights_come_from_the_default_meta_training_run():
    """kflip/weights/default.* is the output of `kflip meta-train --seed 0` with the
    defaults of this version (bit for bit on the CPU it was made on; docs/meta.md)."""
    w = cell_lib.load_weights(None)
    assert w.metadata["learned"] is True
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in w.metadata["config"].items()}
    assert meta.MetaConfig(**cfg) == meta.MetaConfig()
    assert "mnist" not in json.dumps(w.metadata["data"]["datasets"]).lower()
    # the output is the best validated iterate, and it beat the analytic init there
    assert w.metadata["best_val_meta_loss"] < w.metadata["init_val_meta_loss"]


def test_the_baseline_rule_runs_once_per_task_and_is_subtracted(monkeypatch):
    from kflip.meta import loop

    cfg = meta.MetaConfig(**dict(TINY, baseline="bop", min_horizon=5))
    w0 = meta.config.initial_weights(cfg)
    trainer = loop._Trainer(cfg, loop._Runner(1, cfg.hidden_size, w0.beta, w0.eps), None)
    calls = []
    real = loop._evaluate
    monkeypatch.setattr(loop, "_evaluate", lambda job: calls.append(job) or real(job))
    keys = [("mlp-32", "digits", 4), ("mlp-32", "digits", 4), ("mlp-32", "teacher", 6)]
    x = trainer.to_x(np.zeros(len(trainer.x0)))
    first = trainer._map([x] * 3, keys)
    assert len(calls) == 2 + 3  # one baseline run per distinct task, then the members
    assert first[0]["meta_loss"] == first[1]["meta_loss"]
    for r, k in zip(first, keys):
        assert r["meta_loss"] == r["raw_meta_loss"] - trainer._baseline_losses[k]
    trainer._map([x], keys[:1])
    assert len(calls) == 5 + 1  # the baseline's loss is remembered
