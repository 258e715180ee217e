"""The `kflip` command (train, bench, meta-train, export) and kflip.bench / kflip.plots.

Tiny settings only (digits, 1 epoch, widths <= 16, train subsets); the CLI runs
in-process through kflip.cli.main, plus one real subprocess of the console script.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import kflip
from kflip import bench, cli, data, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def _write_npz(path, ds, scale=1):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    up = lambda x: np.kron(x, np.ones((1, scale, scale, 1), np.float32))  # noqa: E731
    # uint8 images like real datasets ship them; kflip.data rescales to [-1, 1].
    to_u8 = lambda x: np.round((up(x) + 1.0) * 127.5).astype(np.uint8)[..., 0]  # noqa: E731
    np.savez(path, x_train=to_u8(ds.x_train), y_train=ds.y_train,
             x_test=to_u8(ds.x_test), y_test=ds.y_test)


# ---- dispatcher -------------------------------------------------------------------
def test_version_console_script():
    exe = shutil.which("kflip")
    assert exe, "the kflip console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"kflip {kflip.__version__}"


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "bench", "meta-train", "export"):
        assert command in text


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "usage: kflip" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "--optimizer", "sgd"],
    ["train", "--hidden", "0"],
    ["train", "--hidden", "a,b"],
    ["bench", "--seeds", "0"],
    ["bench", "--optimizers", "bop,sgd"],
    ["train", "--epochs", "-1"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_option_for_another_model_is_rejected(capsys):
    assert cli.main(["train", "--model", "mlp", "--filters", "8,8,8"]) == 2
    assert "--filters" in capsys.readouterr().err


def test_missing_dataset_says_which_file_to_put_where(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KFLIP_DATA_DIR", raising=False)
    code = cli.main(["train", "--dataset", "kflip_no_such_set", "--data-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "kflip_no_such_set.npz") in err
    assert str(tmp_path / "kflip_no_such_set" / "kflip_no_such_set.npz") in err


@pytest.mark.parametrize("command", ["meta-train", "export"])
def test_plugin_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: kflip {command}" in capsys.readouterr().out


def test_plugin_missing_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.PLUGINS, "export", ("kflip._no_such_module", "x"))
    assert cli.main(["export", "a", "b"]) == 2
    assert "not available in this version" in capsys.readouterr().err


# ---- API validation -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    (dict(optimizers=["sgd"]), "optimizers"),
    (dict(optimizers=[]), "optimizers"),
    (dict(optimizers=["bop", "bop"]), "optimizers"),
    (dict(seeds=0), "seeds"),
    (dict(seeds=[1, 1]), "seeds"),
    (dict(greedy_after=["nope"]), "greedy_after"),
    (dict(timing_steps=0), "timing_steps"),
])
def test_bench_rejects_bad_values(kwargs, name, digits):
    with pytest.raises(ValueError, match=f"`{name}`"):
        bench.bench(digits, output_dir=None, print_fn=None, **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(epochs=0), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(seed=-1), "seed"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(model="vgg"), "model"),
    (dict(model="mlp", model_options={"width": 2.0}), "model_options"),
    (dict(eval_every=0), "eval_every"),
    (dict(optimizer="bop", bop_gamma=0.0), "bop_gamma"),
    (dict(n_train=0), "n_train"),
])
def test_train_rejects_bad_values(kwargs, name, digits):
    with pytest.raises(ValueError, match=f"`{name}`"):
        bench.train(digits, verbose=0, **kwargs)


def test_model_that_does_not_fit_the_input_is_a_clear_error(digits):
    # The larq tutorial CNN (valid 3x3 convs, two pools) needs inputs of >= 18x18.
    with pytest.raises(ValueError, match="`model` 'cnn' cannot be built"):
        bench.build_model("cnn", digits)


# ---- kflip train ----------------------------------------------------------------------
def test_tensorboard_dir(tmp_path, capsys):
    tb = tmp_path / "tb"
    argv = ["train", "--hidden", "4", "--epochs", "1", "--train-examples", "64",
            "--output", str(tmp_path / "run"), "--tensorboard", str(tb), "--quiet"]
    if bench.tensorboard_available():
        assert cli.main(argv) == 0
        assert any(n.startswith("events.out.tfevents") for _, _, fs in os.walk(tb) for n in fs)
    else:  # checked before any training, with the fix in the message
        assert cli.main(argv) == 2
        assert "pip install tensorboard" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_train_fliplstm_saves_a_loadable_model_and_history(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--hidden", "16", "--epochs", "1", "--eval-every", "5",
                     "--output", str(out), "--quiet"])
    assert code == 0
    assert "test accuracy" in capsys.readouterr().out
    with open(out / "history.json") as f:
        h = json.load(f)
    assert h["optimizer"] == "fliplstm" and h["dataset"] == "digits"
    assert h["steps"] == 23  # ceil(1438 / 64)
    steps = [p["step"] for p in h["test_curve"]]
    assert steps == [0, 5, 10, 15, 20, 23]
    assert h["test_accuracy"] == h["test_curve"][-1]["test_accuracy"]
    assert h["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    # Keras per-epoch history carries the test metrics and FlipLSTM's own flip rate.
    assert h["history"]["test_accuracy"] == [h["test_accuracy"]]
    # The generic sign-flip counter agrees with FlipLSTM's internal flip counters.
    total = sum(h["flips"].values())
    assert total > 0
    assert h["history"]["flip_rate"][0] * h["steps"] * h["binary_weights"] == pytest.approx(total)
    # measured from the slots: h and c per weight, plus a few per-tensor scalars
    assert h["state_bytes_per_binary_weight"] == pytest.approx(
        kflip.FlipLSTM().state_bytes_per_weight, rel=0.05)

    model = tf.keras.models.load_model(out / "model.keras")
    kflip.assert_binary(model)
    assert isinstance(model.optimizer, kflip.FlipLSTM)
    ds = data.digits()
    acc, _ = bench.make_evaluator(model)(ds.x_test, ds.y_test)
    assert acc == pytest.approx(h["test_accuracy"], abs=1e-9)


def test_train_is_deterministic_per_seed(digits):
    kw = dict(model_options={"hidden": (8,)}, optimizer="bop", epochs=1, n_train=256,
              eval_every=2, seed=3, verbose=0)
    a, b = bench.train(digits, **kw), bench.train(digits, **kw)
    assert a["test_curve"] == b["test_curve"] and a["flips"] == b["flips"]
    assert sum(a["flips"].values()) > 0


def test_cnn_from_npz_fallback_and_export(tmp_path, digits, capsys):
    # 8x8 digits upsampled to 24x24 so the larq tutorial CNN fits; <dir>/<name>/<name>.npz.
    _write_npz(str(tmp_path / "data" / "digits24" / "digits24.npz"), digits, scale=3)
    out = tmp_path / "cnn"
    code = cli.main(["train", "--dataset", "digits24", "--data-dir", str(tmp_path / "data"),
                     "--model", "cnn", "--filters", "4,4,4", "--dense", "8",
                     "--optimizer", "adam-ste", "--epochs", "1", "--train-examples", "256",
                     "--output", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    with open(out / "history.json") as f:
        h = json.load(f)
    assert h["dataset"] == "digits24" and h["model"] == "cnn" and h["steps"] == 4
    assert h["state_bytes_per_binary_weight"] == 8.0  # Adam: m and v, float32
    assert h["flips_per_step"] > 0  # latent weights cross zero under Adam
    # `kflip export` loads what `kflip train` saved.
    code = cli.main(["export", str(out / "model.keras"), str(tmp_path / "exported")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "exported" / "saved_model.pb").exists()


def test_binarynet_from_env_data_dir_with_greedy(tmp_path, digits, monkeypatch, capsys):
    _write_npz(str(tmp_path / "env" / "digitsflat.npz"), digits)
    monkeypatch.setenv("KFLIP_DATA_DIR", str(tmp_path / "env"))
    out = tmp_path / "bnet"
    code = cli.main(["train", "--dataset", "digitsflat", "--model", "binarynet",
                     "--width", "0.04", "--optimizer", "bop", "--epochs", "1",
                     "--train-examples", "128", "--greedy", "--greedy-seconds", "2",
                     "--greedy-option", "layers=-1", "--greedy-examples", "128",
                     "--output", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "greedy flip search" in capsys.readouterr().out
    with open(out / "history.json") as f:
        h = json.load(f)
    assert h["model"] == "binarynet" and h["steps"] == 2
    g = h["greedy"]
    assert g["options"] == {"order": "gradient", "max_seconds": 2.0, "probe_size": 128,
                            "layers": -1}
    report = g["report"]
    assert report["loss_after"] <= report["loss_before"]
    assert h["test_accuracy"] == g["test_accuracy_after"]
    model = tf.keras.models.load_model(out / "model.keras")
    kflip.assert_binary(model)  # greedy leaves exact +-1 kernels, also for Bop's model


# ---- kflip bench ----------------------------------------------------------------------
def test_bench_every_optimizer(tmp_path, capsys):
    out = tmp_path / "bench"
    code = cli.main(["bench", "--hidden", "8", "--epochs", "1", "--seeds", "1",
                     "--train-examples", "256", "--greedy-after", "fliplstm",
                     "--greedy-seconds", "1", "--greedy-examples", "64",
                     "--greedy-option", "layers=-1",
                     "--timing-steps", "3", "--timing-rounds", "2", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    with open(out / "results.json") as f:
        r = json.load(f)
    names = ["adam-ste", "bop", "fliplstm-gradient", "fliplstm", "fliplstm+greedy"]
    assert [row["optimizer"] for row in r["summary"]] == names
    for name in names:
        assert f"| {name} |" in printed
    # a progress line before every run, with the time left once one run has finished
    starts = [line for line in printed.splitlines() if re.match(r"\[\d/4\] ", line)]
    assert [line.split(" ...")[0] for line in starts] == [
        "[1/4] adam-ste seed 0", "[2/4] bop seed 0", "[3/4] fliplstm-gradient seed 0",
        "[4/4] fliplstm seed 0 (+greedy)"]
    assert "left" not in starts[0] and all(" left)" in line for line in starts[1:])
    assert [run["optimizer"] for run in r["runs"]] == names
    rows = {row["optimizer"]: row for row in r["summary"]}
    assert rows["bop"]["step_time_rel_bop"] == 1.0
    for name in ("adam-ste", "fliplstm-gradient", "fliplstm"):
        assert rows[name]["step_time_rel_bop"] > 0
        assert rows[name]["step_ms"] == pytest.approx(1e3 * r["step_seconds"][name])
    assert rows["adam-ste"]["state_bytes_per_binary_weight"] == 8.0
    assert rows["bop"]["state_bytes_per_binary_weight"] == 4.0
    assert rows["fliplstm"]["state_bytes_per_binary_weight"] == pytest.approx(8.0, rel=0.05)
    assert rows["bop"]["flips_per_step"] > 0 and rows["fliplstm"]["flips_per_step"] > 0
    for run in r["runs"]:
        assert run["steps"] == 4 and run["test_curve"][-1]["step"] == 4
    flip, greedy = r["runs"][3], r["runs"][4]
    assert greedy["greedy"]["test_accuracy_before"] == flip["test_accuracy"]
    assert greedy["greedy"]["report"]["loss_after"] <= greedy["greedy"]["report"]["loss_before"]
    assert r["config"]["seeds"] == [0] and r["machine"]["cpu_count"] >= 1
    for key in ("accuracy_plot", "flip_rate_plot"):
        assert _is_png(r["files"][key])


def test_summary_mean_std_and_ratios():
    runs = [_fake_run("bop", 0), _fake_run("bop", 1), _fake_run("fliplstm", 0)]
    for run, acc, wall in zip(runs, (0.90, 0.94, 0.97), (10.0, 20.0, 30.0)):
        run.update(test_accuracy=acc, wall_seconds=wall, state_bytes_per_binary_weight=4.0)
    runs.append(dict(runs[2], optimizer="fliplstm+greedy", test_accuracy=0.98,
                     wall_seconds=35.0, greedy={"seconds": 5.0}))
    rows = bench.summarize(runs, {"bop": 0.002, "fliplstm": 0.003})
    assert [r["optimizer"] for r in rows] == ["bop", "fliplstm", "fliplstm+greedy"]
    assert rows[0]["test_accuracy_mean"] == pytest.approx(0.92)
    assert rows[0]["test_accuracy_std"] == pytest.approx(np.std([0.90, 0.94], ddof=1))
    assert rows[0]["wall_seconds_mean"] == 15.0
    assert rows[1]["step_time_rel_bop"] == pytest.approx(1.5) and rows[1]["step_ms"] == 3.0
    assert rows[1]["test_accuracy_std"] == 0.0  # one seed
    assert rows[2]["step_time_rel_bop"] is None and rows[2]["greedy_seconds_mean"] == 5.0
    table = bench.format_table(rows)
    assert "| bop | 92.00 +/- 2.83 | 15.0 | 2.00 | 1.00 |" in table
    assert "| fliplstm+greedy | 98.00 +/- 0.00 | 35.0 | - | - |" in table


# ---- plots ---------------------------------------------------------------------------
def _fake_run(name, seed, flips=True):
    curve = [{"step": s, "test_accuracy": 0.1 + 0.08 * s / 10 + 0.01 * seed, "test_loss": 1.0}
             for s in range(0, 110, 10)]
    rate = 1e-3 if flips else 0.0
    fc = [{"step": s, "flip_rate/dense/kernel": rate, "flip_rate/dense_1/kernel": rate / 2,
           "flip_rate": rate} for s in range(10, 110, 10)]
    return {"optimizer": name, "seed": seed, "steps": 100, "test_accuracy": curve[-1]["test_accuracy"],
            "test_curve": curve, "flip_curve": fc, "flips_per_step": 10.0 * flips}


def test_plots_from_results_json(tmp_path):
    runs = [_fake_run(n, s, flips=(n != "adam-ste")) for n in ("adam-ste", "bop") for s in (0, 1)]
    runs.append(dict(_fake_run("bop", 0), optimizer="bop+greedy", test_accuracy=0.95))
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": runs, "config": {"dataset": "x", "seeds": [0, 1]}}))
    files = plots.plot_results(str(path), str(tmp_path / "img"))
    assert set(files) == {"accuracy_plot", "flip_rate_plot"}
    assert all(_is_png(p) for p in files.values())
    with pytest.raises(ValueError, match="`runs`"):
        plots.plot_accuracy_vs_step([], str(tmp_path / "x.png"))
    assert plots._layer_label(1, "flip_rate/quant_dense_1/kernel") == "layer 2 (quant_dense_1)"


# ---- mistakes are refused before training, in one line, exit 2 ----------------------
def _python(code: str):
    """Run ``code`` in a fresh Python, as the console script would start."""
    env = {k: v for k, v in os.environ.items() if k != "KFLIP_DEFER_IMPORTS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)


def test_help_and_version_do_not_start_tensorflow():
    code = (
        "import sys, _kflip_cli\n"
        "for argv in (['kflip', '--version'], ['kflip', '--help']):\n"
        "    sys.argv = argv\n"
        "    try:\n"
        "        _kflip_cli.main()\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert f"kflip {kflip.__version__}" in out.stdout and "usage: kflip" in out.stdout


def test_a_missing_tensorflow_is_one_line_and_exit_2():
    code = (
        "import sys\n"
        "sys.modules['tensorflow'] = None  # as if TensorFlow were not installed\n"
        "import _kflip_cli\n"
        "sys.argv = ['kflip', 'train']\n"
        "sys.exit(_kflip_cli.main())\n"
    )
    out = _python(code)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kflip train: error: tensorflow is not installed")


def test_console_script_error_is_one_line_without_tensorflow_noise(tmp_path):
    exe = shutil.which("kflip")
    assert exe, "the kflip console script is not installed (pip install -e .)"
    target = tmp_path / "a-file"
    target.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([exe, "train", "--output", str(target)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        f"kflip train: error: `output_dir` {str(target)!r} exists and is not a directory."
    ]


@pytest.mark.parametrize("argv, flag", [
    (["train", "--model", "binarynet", "--width", "inf"], "--width"),
    (["train", "--greedy-seconds", "nan"], "--greedy-seconds"),
    (["train", "--greedy-seconds", "-1"], "--greedy-seconds"),
    (["train", "--bop-gamma", "-1"], "--bop-gamma"),
    (["bench", "--bop-threshold", "nan"], "--bop-threshold"),
])
def test_non_finite_numbers_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def _junk_weights(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not an archive")
    return str(path)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--greedy", "--greedy-option", "bogus=1"], "bogus"),
    (["train", "--greedy", "--greedy-option", "order=bogus"], "`order`"),
    (["bench", "--greedy-option", "max_seconds=-3"], "`max_seconds`"),
    (["train", "--optimizer", "bop", "--lstm-weights", "JUNK"], "`lstm_weights`"),
    (["bench", "--optimizers", "bop,adam-ste", "--lstm-weights", "JUNK"], "`lstm_weights`"),
    (["train", "--lstm-weights", "JUNK"], "junk.npz"),
    (["train", "--lstm-weights", "/nonexistent/w.npz"], "/nonexistent/w.npz"),
    (["meta-train", "--iterations", "0"], "`iterations`"),
    (["meta-train", "--sigma", "-1"], "`sigma`"),
    (["meta-train", "--init", "/nonexistent"], "/nonexistent"),
])
def test_mistakes_exit_2_in_one_line_before_training(argv, needle, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [_junk_weights(tmp_path) if a == "JUNK" else a for a in argv]
    trained = []
    monkeypatch.setattr(bench.training, "_run", lambda *a, **k: trained.append(1) or 1 / 0)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert err.startswith(f"kflip {argv[0]}: error: ")
    assert not trained
    assert not any(p.name.startswith("kflip-") for p in tmp_path.iterdir())


def test_meta_train_help_shows_defaults_once(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["meta-train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 4000)" in text and "by ~10% (default: 0.1)" in text
    assert "(default: mlp784-256-256)" in text  # comma lists shown as typed
    assert "(default: None)" not in text and "(default: <out>.log.jsonl)" in text
