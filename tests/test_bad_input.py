"""Bad input to FlipLSTM and its LSTM weights: a clear error naming the parameter or
file, and never a silently wrong rule (binary kernels stay exactly +-1)."""

import dataclasses

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import kflip
from kflip import cell as cell_lib


def binary_var(shape=(4, 3), seed=0):
    value = np.sign(np.random.RandomState(seed).randn(*shape)).astype(np.float32)
    return lq.quantized_variable.QuantizedVariable.from_variable(
        tf.Variable(value), quantizer=lq.quantizers.NoOp(precision=1), precision=1
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(flip_threshold=np.float32(-5)), "flip_threshold"),
        (dict(flip_threshold=np.float32("nan")), "flip_threshold"),
        (dict(flip_threshold=np.float64("inf")), "flip_threshold"),
        (dict(flip_threshold="abc"), "flip_threshold"),
        (dict(flip_threshold=True), "flip_threshold"),
        (dict(flip_threshold=np.array([0.1, 0.2])), "flip_threshold"),
        (dict(learning_rate=np.float32("nan")), "learning_rate"),
        (dict(learning_rate=np.float32(-1e-3)), "learning_rate"),
        (dict(learning_rate="fast"), "learning_rate"),
        (dict(max_flip_rate=np.float32("nan")), "max_flip_rate"),
        (dict(max_flip_rate="0.1"), "max_flip_rate"),
        (dict(latent_clip=np.float32("nan")), "latent_clip"),
        (dict(hidden_size=2.0), "hidden_size"),
        (dict(hidden_size=np.int64(-1)), "hidden_size"),
        (dict(hidden_size=True), "hidden_size"),
        (dict(float_optimizer={"bad": 1}), "float_optimizer"),
    ],
)
def test_bad_hyper_parameter_is_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kflip.FlipLSTM(**kwargs)


def test_numpy_scalars_are_accepted_as_numbers():
    opt = kflip.FlipLSTM(
        flip_threshold=np.float32(0.25),
        learning_rate=np.float64(1e-3),
        max_flip_rate=np.float32(0.5),
        hidden_size=np.int64(kflip.FlipLSTM().hidden_size + 1),
        latent_clip=np.float16(2.0),
    )
    assert opt.max_flip_rate == 0.5 and isinstance(opt.max_flip_rate, float)
    assert opt.get_config()["flip_threshold"] == 0.25
    assert opt.hidden_size == kflip.FlipLSTM().hidden_size + 1


def test_hidden_size_padding_message_names_both_sizes():
    two = kflip.bop_weights(1e-6, 1e-3, hidden_size=2)
    with pytest.raises(ValueError, match="pick hidden_size >= 2 "):
        kflip.FlipLSTM(two, hidden_size=1)


def _weights_config(**changes):
    config = kflip.bop_weights(1e-6, 1e-3).get_config()
    config.update(changes)
    return config


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(out_bias=float("nan")), "out_bias"),
        (dict(out_bias=float("inf")), "out_bias"),
        (dict(out_bias=-float("inf")), "out_bias"),
        (dict(eps=float("inf")), "eps"),
        (dict(eps=0.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(beta=1.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(out_kernel=[[1.0]]), "out_kernel"),
        (dict(out_kernel=[]), "out_kernel"),
        (dict(kernel=[[0.0]]), "`kernel`"),
    ],
)
def test_bad_lstm_weights_are_refused_by_field(changes, match):
    with pytest.raises(ValueError, match=match):
        kflip.FlipLSTM(_weights_config(**changes))


def _saved(tmp_path, **changes):
    w = kflip.bop_weights(1e-6, 1e-3)
    arrays = {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.name != "metadata"}
    arrays.update(changes)
    path = tmp_path / "w.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(out_bias=np.float32("nan")), "out_bias"),
        (dict(out_bias=np.float32("inf")), "out_bias"),
        (dict(eps=np.float32("inf")), "eps"),
        (dict(out_bias=None), "no array 'out_bias'"),
        (dict(kernel=None), "no array 'kernel'"),
    ],
)
def test_bad_weights_file_names_the_file_and_the_field(tmp_path, changes, match):
    path = _saved(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as err:
        kflip.FlipLSTM(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"garbage, not an archive", b""])
def test_garbage_weights_file_is_not_called_pickled(tmp_path, content):
    path = tmp_path / "w.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not an .npz archive") as err:
        kflip.FlipLSTM(str(path))
    assert str(path) in str(err.value) and "pickle" not in str(err.value)


def test_truncated_weights_file_names_the_file(tmp_path):
    good = _saved(tmp_path).read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError) as err:
        kflip.FlipLSTM(str(path))
    assert str(path) in str(err.value)


def test_weights_path_that_is_a_directory(tmp_path):
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(ValueError, match="not an .npz archive"):
        kflip.FlipLSTM(str(tmp_path / "d.npz"))


def test_corrupt_metadata_json_names_the_file(tmp_path):
    path = _saved(tmp_path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="w.json"):
        kflip.FlipLSTM(str(path))


def test_gradient_spike_does_not_freeze_the_rule():
    """A finite gradient whose square overflows float32 must not stop later flips."""
    var = binary_var((8, 8))
    opt = kflip.FlipLSTM(kflip.bop_weights(0.0, 0.5))
    spike = np.full((8, 8), 3e19, np.float32)
    before = var.numpy().copy()
    opt.apply_gradients([(tf.constant(spike), var)])
    np.testing.assert_array_equal(var.numpy(), before)  # the spike step is skipped
    v = opt.get_slot(var, "v").numpy()
    assert np.isfinite(v)
    flips = 0
    for _ in range(4):
        theta = var.numpy().copy()
        opt.apply_gradients([(tf.constant(theta), var)])  # every weight wants to flip
        flips += int(np.sum(var.numpy() != theta))
        assert np.all(np.abs(var.numpy()) == 1)
    assert flips > 0
    assert np.isfinite(opt.get_slot(var, "v").numpy())


@pytest.mark.parametrize("jit", [False, True])
def test_max_flip_rate_holds_when_outputs_tie(jit):
    """Equal gradients give equal g_t: the cap must still hold exactly."""
    var = binary_var((10, 10))
    opt = kflip.FlipLSTM(kflip.bop_weights(0.0, 0.5), max_flip_rate=0.01)

    @tf.function(jit_compile=jit)
    def step(g):
        opt.apply_gradients([(g, var)])

    for _ in range(3):
        theta = var.numpy().copy()
        step(tf.constant(theta))  # every coordinate has the same |g|: all tie
        assert int(np.sum(var.numpy() != theta)) == 1
        assert np.all(np.abs(var.numpy()) == 1)


def test_limit_flips_keeps_exactly_k_lowest_index_among_ties():
    flip = tf.constant([True, False, True, True, True])
    y = tf.constant([-1.0, -9.0, -2.0, -1.0, -2.0])
    kept = cell_lib._limit_flips(flip, y, 2).numpy()
    np.testing.assert_array_equal(kept, [False, False, True, False, True])
    kept = cell_lib._limit_flips(flip, y, 3).numpy()
    np.testing.assert_array_equal(kept, [True, False, True, False, True])


def test_checks_docstring_examples():
    import doctest

    from kflip import _checks

    assert doctest.testmod(_checks).failed == 0
