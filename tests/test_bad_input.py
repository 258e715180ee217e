"""Bad input to FlipLSTM and its LSTM weights: a clear error naming the parameter or
file, and never a silently wrong rule (binary kernels stay exactly +-1)."""

import dataclasses

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import kflip
from kflip import cell as cell_lib
from kflip import rule as rule_lib


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
    kept = rule_lib._limit_flips(flip, y, 2).numpy()
    np.testing.assert_array_equal(kept, [False, False, True, False, True])
    kept = rule_lib._limit_flips(flip, y, 3).numpy()
    np.testing.assert_array_equal(kept, [True, False, True, False, True])


def test_checks_docstring_examples():
    import doctest

    from kflip import _checks

    assert doctest.testmod(_checks).failed == 0


# ---- datasets -----------------------------------------------------------------------
def _npz(tmp_path, name="set", **changes):
    rng = np.random.RandomState(0)
    arrays = dict(
        x_train=rng.randint(0, 256, (20, 8, 8)).astype(np.uint8),
        y_train=np.arange(20) % 4,
        x_test=rng.randint(0, 256, (8, 8, 8)).astype(np.uint8),
        y_test=np.arange(8) % 4,
    )
    arrays.update(changes)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(y_train=np.r_[-1, np.arange(19) % 4]), "y_train: labels must be >= 0"),
        (dict(y_train=np.r_[0.5, np.arange(19) % 4]), "y_train: labels must be whole"),
        (dict(y_test=np.r_[np.nan, np.arange(7) % 4]), "y_test: labels must be whole"),
        (dict(y_test=np.r_[9, np.arange(7) % 4]), "y_test has label 9, outside the 4 classes"),
        (dict(y_train=np.arange(19) % 4), "x_train has 20 examples but y_train has 19"),
        (dict(x_test=np.full((8, 8, 8), np.nan, np.float32)), "x_test contains NaN"),
        (dict(y_train=np.array(["a"] * 20)), "labels must be integers"),
    ],
)
def test_bad_dataset_file_is_refused_by_name(tmp_path, changes, match):
    path = _npz(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as err:
        kflip.data.load("set", data_dir=str(tmp_path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"junk", b""])
def test_garbage_or_truncated_dataset_file_names_the_file(tmp_path, content):
    good = _npz(tmp_path).read_bytes()
    path = tmp_path / "set.npz"
    path.write_bytes(content or good[: len(good) // 2])
    with pytest.raises(ValueError) as err:
        kflip.data.load("set", data_dir=str(tmp_path))
    assert str(path) in str(err.value)


def test_dataset_typo_suggests_the_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown dataset 'mnsit'; did you mean 'mnist'"):
        kflip.data.load("mnsit", data_dir=str(tmp_path))


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="`data_dir` .*nowhere.* is not a directory"):
        kflip.data.load("mnist", data_dir=str(tmp_path / "nowhere"))


def test_unset_data_dir_is_not_shown_as_a_literal_variable(monkeypatch):
    monkeypatch.delenv(kflip.data.ENV_DATA_DIR, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        kflip.data.load("kflip_no_such_set")
    text = str(err.value)
    assert "$KFLIP_DATA_DIR/" not in text and "No data directory is set" in text


def test_cli_refuses_bad_labels_with_exit_2(tmp_path, capsys):
    from kflip import cli

    (tmp_path / "d").mkdir()
    _npz(tmp_path / "d", name="set", y_test=np.r_[9, np.arange(7) % 4])
    code = cli.main(["train", "--dataset", "set", "--data-dir", str(tmp_path / "d"),
                     "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "outside the 4 classes" in err
    assert not (tmp_path / "out").exists()


# ---- export -------------------------------------------------------------------------
def _tiny_model():
    tf.keras.utils.set_random_seed(0)
    model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(8,))
    kflip.snap_binary_weights(model)
    return model


def test_export_with_wrong_sample_leaves_nothing_on_disk(tmp_path):
    target = tmp_path / "served"
    with pytest.raises(ValueError, match="`sample` has shape"):
        kflip.export(_tiny_model(), str(target), sample=np.zeros((4, 28, 28, 1), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_export_failure_midway_leaves_nothing_on_disk(tmp_path, monkeypatch):
    from kflip import export as export_lib

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_lib, "_write_report", broken)
    with pytest.raises(OSError, match="disk full"):
        kflip.export(_tiny_model(), str(tmp_path / "served"))
    assert list(tmp_path.iterdir()) == []


def test_export_overwrite_leaves_no_stale_file(tmp_path):
    target = tmp_path / "served"
    target.mkdir()
    (target / "model.tflite").write_bytes(b"stale")
    report = kflip.export(_tiny_model(), str(target), overwrite=True)
    assert not (target / "model.tflite").exists()
    assert (target / "saved_model.pb").exists() and report["path"] == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


def test_export_report_is_strict_json(tmp_path):
    import json

    from kflip import export as export_lib

    path = tmp_path / "r.json"
    export_lib._write_report({"max_abs_diff": float("nan"), "n": 1}, str(path))
    assert json.loads(path.read_text()) == {"max_abs_diff": None, "n": 1}
    assert "NaN" not in path.read_text()


def test_export_into_an_impossible_dir_is_exit_2_in_one_line(tmp_path, capsys):
    from kflip import cli

    model_path = tmp_path / "m.keras"
    _tiny_model().save(model_path)
    (tmp_path / "a-file").write_text("")
    assert cli.main(["export", str(model_path), str(tmp_path / "a-file" / "sub" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kflip export: error: ") and len(err.splitlines()) == 1


# ---- greedy flip search probes --------------------------------------------------------
def _greedy_model():
    tf.keras.utils.set_random_seed(0)
    model = kflip.models.mlp(input_shape=(8, 8, 1), num_classes=4, hidden=(8,))
    kflip.snap_binary_weights(model)
    return model


_X = np.random.RandomState(0).uniform(-1, 1, (32, 8, 8, 1)).astype(np.float32)
_Y = np.arange(32) % 4


@pytest.mark.parametrize(
    "x, y, match",
    [
        (_X, _Y[:10], "`y` has 10 examples but `x` has 32"),
        (_X, np.r_[0.5, _Y[1:]], "`y`: labels must be whole numbers"),
        (_X, np.r_[-1, _Y[1:]], "`y`: labels must be >= 0"),
        (np.where(np.arange(32)[:, None, None, None] == 3, np.nan, _X), _Y, "`x`: .*finite"),
        (_X, None, "`y` is required"),
    ],
)
def test_greedy_probe_is_refused_at_construction_and_call(x, y, match):
    with pytest.raises(ValueError, match=match):
        kflip.GreedyFlip(x, y)
    model = _greedy_model()
    before = [v.numpy().copy() for v in kflip.binary_variables(model)]
    with pytest.raises(ValueError, match=match):
        kflip.greedy_flip(model, x, y, max_candidates=4)
    for got, want in zip(kflip.binary_variables(model), before):
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("label", [4, 1000])
def test_greedy_label_outside_the_model_classes(label):
    y = np.r_[label, _Y[1:]]
    with pytest.raises(ValueError, match=f"label {label}, but the model has 4 outputs"):
        kflip.greedy_flip(_greedy_model(), _X, y, max_candidates=4)
