"""The LSTM weights and the coordinatewise cell (kflip.cell)."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

import kflip
from conftest import random_lstm_weights
from kflip import cell as C
from kflip import weights_io


def _numpy_lstm(w, x, h, c):
    """Reference LSTM in numpy: x [N, F], h/c [N, H]."""
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    H = w.hidden_size
    z = x @ w.kernel + h @ w.recurrent + w.bias
    i, f, g, o = sig(z[:, :H]), sig(z[:, H : 2 * H]), np.tanh(z[:, 2 * H : 3 * H]), sig(z[:, 3 * H :])
    c = f * c + i * g
    h = o * np.tanh(c)
    return h @ w.out_kernel + w.out_bias, h, c


@pytest.mark.parametrize("constant", [False, True])
def test_lstm_cell_matches_numpy_reference(constant):
    w = random_lstm_weights(hidden=2)
    rng = np.random.RandomState(1)
    x = rng.randn(50, 2).astype(np.float32)
    h = rng.randn(50, 2).astype(np.float32) * 0.3
    c = rng.randn(50, 2).astype(np.float32) * 0.3
    cell = C.CellTensors.from_weights(w, constant=constant)
    y, h1, c1 = C.lstm_cell(cell, [tf.constant(x[:, 0]), tf.constant(x[:, 1])], tf.constant(h), tf.constant(c))
    ry, rh, rc = _numpy_lstm(w, x, h, c)
    np.testing.assert_allclose(y.numpy(), ry, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h1.numpy(), rh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c1.numpy(), rc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_recurrent_weights_below_half_an_ulp_are_dropped_exactly(jit):
    """Input-free gates with recurrent weights too small to change the float32 sum
    are trace-time constants; eagerly the result is bit-identical to the full cell."""
    w = kflip.bop_weights(1e-7, 1e-4)
    rec = np.array([[2e-8, -3e-8, 1.5e-8, 4e-8]], np.float32)  # |rec| < ulp(bias)/2 except c~
    w = kflip.LSTMWeights(w.kernel, rec, w.bias, w.out_kernel, w.out_bias)
    assert [C._absorbed(float(w.bias[g]), float(rec[0, g])) for g in range(4)] == [True, True, False, True]
    rng = np.random.RandomState(0)
    x = tf.constant(rng.randn(1000).astype(np.float32) * 1e-4)
    c = tf.constant(rng.randn(1000, 1).astype(np.float32) * 1e-6)
    h = tf.constant(np.tanh(c.numpy()) * rng.choice([-1.0, 1.0], size=(1000, 1)).astype(np.float32))

    def run(cell):
        f = lambda: C.lstm_cell(cell, [x, x * 1e3], h, c)  # noqa: E731
        return tf.function(f, jit_compile=True)() if jit else f()

    const = C.CellTensors.from_weights(w, constant=True)
    graph = tf.function(lambda: C.lstm_cell(const, [x, x * 1e3], h, c)).get_concrete_function().graph
    assert not [op for op in graph.get_operations() if op.type == "Sigmoid"]  # i, f, o folded
    got = run(const)
    want = run(C.CellTensors.from_weights(w, constant=False))
    for a, b in zip(got, want):
        if jit:  # XLA's float32 sigmoid vs the gate constant folded in float64: ulps
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-13)
        else:
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_weights_save_load_roundtrip(tmp_path):
    w = random_lstm_weights(hidden=2)
    w = kflip.LSTMWeights(**{**w.get_config(), "metadata": {"init": "test", "learned": False}})
    path = tmp_path / "rule.npz"
    w.save(str(path))
    meta = json.loads((tmp_path / "rule.json").read_text())
    assert meta["format"] == weights_io.FORMAT and meta["hidden_size"] == 2 and meta["init"] == "test"
    back = kflip.LSTMWeights.load(str(path))
    for k in ("kernel", "recurrent", "bias", "out_kernel"):
        np.testing.assert_array_equal(getattr(back, k), getattr(w, k))
    assert back.out_bias == pytest.approx(w.out_bias) and back.metadata["init"] == "test"
    # The npz holds only numeric arrays: it loads with allow_pickle=False.
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) >= {"kernel", "recurrent", "bias", "out_kernel", "out_bias"}


def test_a_failed_weights_save_leaves_the_old_files_whole(tmp_path):
    path = tmp_path / "rule.npz"
    kflip.bop_weights().save(str(path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = kflip.LSTMWeights(**{**random_lstm_weights(hidden=2).get_config(),
                               "metadata": {"not json": object()}})
    with pytest.raises(TypeError):
        bad.save(str(path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files
    assert kflip.LSTMWeights.load(str(path)).metadata["init"] == "analytic-bop"


def test_shipped_default_weights_load_and_say_what_they_are():
    w = C.load_weights(None)
    assert w.hidden_size >= 1
    assert "init" in w.metadata and "learned" in w.metadata
    if not w.metadata["learned"]:
        assert w.metadata["init"].startswith("analytic")


def test_shipped_weights_load_by_name_and_a_name_is_never_a_path(tmp_path, monkeypatch):
    import os

    shipped = [f[:-4] for f in os.listdir(os.path.dirname(C.DEFAULT_WEIGHTS)) if f.endswith(".npz")]
    assert "default" in shipped
    for name in shipped:
        w = C.load_weights(name)
        np.testing.assert_array_equal(w.bias, C.LSTMWeights.load(C.shipped_path(name)).bias)
    assert C.shipped_path("no-such-weights") is None
    monkeypatch.chdir(tmp_path)
    kflip.bop_weights(1e-7, 1e-4).save("default.npz")  # a file named like shipped weights
    assert C.load_weights("./default.npz").metadata["init"].startswith("analytic")
    assert C.load_weights("default").metadata.get("learned")


def test_bad_weights_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="kernel"):
        kflip.LSTMWeights(np.zeros((3, 4)), np.zeros((1, 4)), np.zeros(4), np.zeros(1), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        kflip.LSTMWeights(np.full((2, 4), np.nan), np.zeros((1, 4)), np.zeros(4), np.zeros(1), 0.0)
    with pytest.raises(ValueError, match="beta"):
        kflip.LSTMWeights(np.zeros((2, 4)), np.zeros((1, 4)), np.zeros(4), np.zeros(1), 0.0, beta=1.0)
    with pytest.raises(FileNotFoundError, match="weights"):
        kflip.LSTMWeights.load(str(tmp_path / "missing.npz"))
    with pytest.raises(TypeError, match="weights"):
        C.load_weights(42)
    with pytest.raises(ValueError, match="gamma"):
        kflip.bop_weights(gamma=1.5)
    with pytest.raises(ValueError, match="threshold"):
        kflip.bop_weights(threshold=-1.0)


def test_blend_inputs_moves_the_candidate_weight_between_the_two_features():
    raw = kflip.bop_weights(1e-6, 1e-3)
    normalized = kflip.bop_weights(1e-6, 1e-3, normalized=True)
    w = C.blend_inputs(raw, raw_scale=0.0, normalized=float(raw.kernel[0, 2]))
    np.testing.assert_array_equal(w.kernel, normalized.kernel)  # all on the normalised one
    np.testing.assert_array_equal(w.bias, raw.bias)
    half = C.blend_inputs(raw, raw_scale=0.5, normalized=1e-3)
    assert half.kernel[0, 2] == np.float32(0.5 * raw.kernel[0, 2]) and half.kernel[1, 2] == np.float32(1e-3)
    with pytest.raises(ValueError, match="raw_scale"):
        C.blend_inputs(raw, raw_scale=-1.0, normalized=0.0)
    with pytest.raises(ValueError, match="normalized"):
        C.blend_inputs(raw, raw_scale=1.0, normalized=float("nan"))
    with pytest.raises(ValueError, match="hidden size 1"):
        C.blend_inputs(raw.padded(2), raw_scale=1.0, normalized=0.0)
    gated = dataclasses.replace(raw, kernel=raw.kernel + np.float32(1.0))
    with pytest.raises(ValueError, match="read no input"):
        C.blend_inputs(gated, raw_scale=1.0, normalized=0.0)
