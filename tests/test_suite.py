"""The task suite (kflip.suite, `kflip bench --suite`): options, statistics, a tiny
end-to-end suite on digits (API, resume, console script) and bad input.

Tiny settings only: digits-mlp cells scaled to 20-30 steps, 1-2 seeds, 2 optimizers
and a two-point tuning grid (7 training runs in all, the console script's among them);
MNIST is never needed.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import kflip
from kflip import cli, stats, suite
from kflip.suite import FIXED, Cell, CellResult, OptimizerRow, SuiteOptions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


# ---- options ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    (dict(cells=("nope",)), "`cells`"),
    (dict(cells=("cnn@300",)), "`cells`"),
    (dict(cells="cnn"), "`cells`"),
    (dict(seeds=0), "`seeds`"),
    (dict(seeds=-2), "`seeds`"),
    (dict(seeds=1.5), "`seeds`"),
    (dict(steps_scale=0.0), "`steps_scale`"),
    (dict(steps_scale=float("nan")), "`steps_scale`"),
    (dict(optimizers=("sgd",)), "`optimizers`"),
    (dict(optimizers=()), "`optimizers`"),
    (dict(optimizers=("bop-default", "bop-default")), "`optimizers`"),
    (dict(evals=0), "`evals`"),
    (dict(batch_size=0), "`batch_size`"),
    (dict(bop_gammas=(2.0,)), "`bop_gammas`"),
    (dict(bop_thresholds=()), "`bop_thresholds`"),
    (dict(bop2nd_thresholds=(-1e-6,)), "`bop2nd_thresholds`"),
    (dict(val_fraction=0.9), "`val_fraction`"),
    (dict(optimizers=("adam-ste",), lstm_weights="x.npz"), "`lstm_weights`"),
    (dict(runs_per_process=0), "`runs_per_process`"),
])
def test_bad_options_name_their_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SuiteOptions(**kwargs)


def test_options_are_frozen():
    with pytest.raises(Exception):
        SuiteOptions().seeds = 3


def test_cell_selection():
    everything = SuiteOptions().selected_cells()
    assert len(everything) == len(suite.MODELS) * len(suite.LENGTHS)
    held = {c.model for c in everything if c.held_out}
    assert held == {"resnet", "mlp784-256-10"}
    assert {len(c.seeds) for c in everything if c.model == "digits-mlp"} == {5}
    assert {len(c.seeds) for c in everything if c.model == "cnn"} == {3}
    names = lambda **kw: [c.name for c in SuiteOptions(**kw).selected_cells()]  # noqa: E731
    assert names(cells=("cnn",)) == ["cnn@250", "cnn@1500", "cnn@6000"]
    assert names(cells=("6000",)) == [f"{m}@6000" for m in suite.MODELS]
    assert names(cells=("cnn", "resnet", "250")) == ["cnn@250", "resnet@250"]
    assert names(cells=("resnet@1500", "digits-mlp@250")) == ["digits-mlp@250", "resnet@1500"]
    scaled = SuiteOptions(cells=("cnn@1500",), steps_scale=0.01, seeds=2).selected_cells()
    assert [(c.steps, c.seeds) for c in scaled] == [(15, (0, 1))]


def test_tuning_grids():
    o = SuiteOptions(bop_thresholds=(1e-8, 1e-7), bop_gammas=(1e-4,))
    assert [dict(s.params) for s in suite.tuning_grid(o, "bop")] == [
        {"gamma": 1e-4, "threshold": 1e-8}, {"gamma": 1e-4, "threshold": 1e-7}]
    assert len(suite.tuning_grid(SuiteOptions(), "bop2nd")) == 9
    assert all(dict(s.params)["sigma"] == 1e-2 for s in suite.tuning_grid(o, "bop2nd"))


def test_cli_defaults_match_the_suite_options():
    o, a = SuiteOptions(), cli.build_parser().parse_args(["bench", "--suite"])
    for name in ("bop_thresholds", "bop_gammas", "bop2nd_thresholds", "bop2nd_gammas",
                 "evals", "steps_scale"):
        assert getattr(a, name) == getattr(o, name), name


# ---- statistics on hand-made numbers ----------------------------------------------
def _row(label, accs):
    mean, std = suite.bench._mean_std(accs)
    return OptimizerRow(label, FIXED.get(label, FIXED["adam-ste"]), tuple(accs), mean, std)


CELL = Cell("cnn", 1500, 1000, False, (0, 1, 2))


@pytest.mark.parametrize("flip, verdict", [
    ((0.960, 0.965, 0.962), "win"),    # +1.0 points on every seed
    ((0.949, 0.956, 0.951), "tie"),    # -0.1 / +0.1 / -0.1
    ((0.940, 0.944, 0.941), "loss"),   # about -1.1 points on every seed
])
def test_verdict_against_the_best_baseline(flip, verdict):
    rows = [_row("fliplstm", flip), _row("bop-default", (0.90, 0.91, 0.92)),
            _row("adam-ste", (0.950, 0.955, 0.952))]
    r = suite.compare_cell(CELL, rows, [])
    assert r.best_baseline == "adam-ste"  # the best by mean
    expected = stats.paired([100 * a for a in flip], [95.0, 95.5, 95.2])
    assert r.difference == pytest.approx(expected)
    assert r.verdict == verdict
    assert r.speedup is None  # no curves given


def test_speedup_from_the_mean_curve():
    rows = [_row("fliplstm", (0.96, 0.96)), _row("bop-example", (0.90, 0.90))]
    cell = Cell("cnn", 250, 400, False, (0, 1))
    curves = [[[0, 0.1], [100, 0.80], [200, 0.96], [400, 0.96]],
              [[0, 0.1], [100, 0.88], [200, 0.96], [400, 0.96]]]
    # mean curve 0.1, 0.84, 0.96: 0.90 is reached halfway from step 100 to 200
    assert suite.compare_cell(cell, rows, curves).speedup == pytest.approx(150 / 400)
    assert suite.mean_curve(curves) == ([0, 100, 200, 400], pytest.approx([0.1, 0.84, 0.96, 0.96]))
    assert suite.speedup([0, 10], [0.2, 0.3], 0.5, 10) is None
    assert suite.speedup([0, 10], [0.6, 0.7], 0.5, 10) == 0.0


def test_no_fliplstm_or_no_baseline_gives_no_difference():
    assert suite.compare_cell(CELL, [_row("adam-ste", (0.9, 0.9, 0.9))], []).difference is None
    one = suite.compare_cell(CELL, [_row("fliplstm", (0.9, 0.9, 0.9))], [])
    assert one.difference is None and one.verdict is None and one.best_baseline is None


def test_tables_and_heatmap_from_hand_made_results(tmp_path):
    win = stats.paired([97, 98, 97.5], [96, 96.5, 96.2])
    results = [
        CellResult(CELL, (_row("fliplstm", (0.97, 0.98, 0.975)),
                          _row("adam-ste", (0.96, 0.965, 0.962))), "adam-ste", win, 0.42, {}),
        CellResult(Cell("resnet", 250, 250, True, (0, 1, 2)),
                   (_row("fliplstm", (0.9, 0.9, 0.9)),), None, None, None, {}),
    ]
    text = suite.format_tables(results)
    assert "### Cells used for tuning decisions" in text and "### Held-out cells" in text
    assert "| cnn@1500 | 1000 | 3 | 97.50 +- 0.50 | 96.23 +- 0.25 | adam-ste |" in text
    assert "win | 0.42 |" in text
    assert "1 win, 0 ties, 0 losses" in text and "0 wins, 0 ties, 0 losses" in text
    assert _is_png(suite.plot_heatmap(results, str(tmp_path / "h.png")))


# ---- a tiny suite, end to end ----------------------------------------------------
def test_tiny_suite_cli_then_api_resume(tmp_path):
    """The console script runs seed 0; the Python API continues the same directory."""
    exe = shutil.which("kflip")
    assert exe, "the kflip console script is not installed (pip install -e .)"
    out = tmp_path / "suite"
    argv = [exe, "bench", "--suite", "--cells", "digits-mlp@250", "--steps-scale", "0.12",
            "--seeds", "1", "--optimizers", "fliplstm,bop-tuned", "--evals", "3",
            "--bop-thresholds", "1e-6", "--bop-gammas", "1e-3,1e-2", "--output", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| cell | steps | seeds | fliplstm | bop-tuned | best baseline |" in done.stdout
    assert "| digits-mlp@250 | 30 | 1 |" in done.stdout
    assert "4 run(s) trained, 0 reused" in done.stdout  # 2 tuning runs, 2 test runs
    assert _is_png(out / "heatmap.png") and (out / "suite.md").exists()

    # continue with a second seed: only its two test runs train, the rest is reused
    options = SuiteOptions(
        cells=("digits-mlp@250",), seeds=2, steps_scale=0.12, evals=3,
        optimizers=("fliplstm", "bop-tuned"),
        bop_thresholds=(1e-6,), bop_gammas=(1e-3, 1e-2), output_dir=str(out))
    lines = []
    second = suite.run_suite(options, print_fn=lines.append)
    assert (second.ran, second.skipped) == (2, 4)
    assert "4 run(s) already in" in lines[0]
    (cell,) = second.cells
    assert cell.cell.steps == 30 and [r.label for r in cell.rows] == ["fliplstm", "bop-tuned"]
    assert all(0.0 <= a <= 1.0 for r in cell.rows for a in r.accuracies)
    assert cell.best_baseline == "bop-tuned" and cell.difference.n == 2
    chosen, _ = max(cell.tuning["bop-tuned"], key=lambda s: s[1])
    assert cell.rows[1].spec == chosen and dict(chosen.params)["threshold"] == 1e-6
    records = {r["key"]: r for r in second.runs}
    assert len(records) == 6
    val = [r for r in records.values() if r["split"] == "val"]
    assert len(val) == 2 and {r["seed"] for r in val} == {0}
    test = [r for r in records.values() if r["split"] == "test"]
    assert all(r["steps"] == 30 and [s for s, _ in r["curve"]] == [0, 10, 20, 30] for r in test)
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 6 and saved["cells"][0]["cell"] == "digits-mlp@250"
    assert saved["cells"][0]["verdict"] == cell.verdict
    assert (out / "suite.md").read_text().strip() == second.table
    assert "| digits-mlp@250 | 30 | 2 |" in second.table
    # the steadier score: each test run's mean over its last 3 evaluations (steps 10-30)
    late = [np.mean([a for s, a in r["curve"] if s > 0]) for r in test
            if r["optimizer"] == "fliplstm"]
    late_tables = second.table.split("scored by the mean of the last 3 test evaluations")
    assert len(late_tables) == 2 and f"| {100 * np.mean(late):.2f} +- " in late_tables[1]
    (late_cell,) = json.loads((out / "results.json").read_text())["late_cells"]
    assert late_cell["rows"][0]["mean"] == pytest.approx(np.mean(late))
    assert _is_png(out / "heatmap.png")
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

    # the same suite again: nothing trains, the same table
    third = suite.run_suite(options, print_fn=None)
    assert (third.ran, third.skipped) == (0, 6) and third.table == second.table


def test_a_run_in_a_worker_process_equals_one_in_this_process(tmp_path):
    runs = {}
    for per_process in (1, None):
        options = SuiteOptions(cells=("digits-mlp@250",), seeds=1, steps_scale=0.12, evals=2,
                               optimizers=("bop-example",), plots=False,
                               runs_per_process=per_process, output_dir=str(tmp_path / str(per_process)))
        result = suite.run_suite(options, print_fn=None)
        (record,) = result.runs
        runs[per_process] = {k: record[k] for k in ("test_accuracy", "test_loss", "curve")}
    assert runs[1] == runs[None]


def test_runs_are_keyed_by_settings_and_flip_lstm_weights(tmp_path):
    path = str(tmp_path / "bop.npz")
    kflip.bop_weights().save(path)
    shipped, bop = suite.weights_id(), suite.weights_id(path)
    assert shipped == suite.weights_id("default") and shipped != bop
    key = lambda spec, weights="w", seed=0, split="test": suite.run_key(  # noqa: E731
        CELL, spec, seed, split, weights)
    assert key(FIXED["fliplstm"], shipped) != key(FIXED["fliplstm"], bop)
    assert key(FIXED["bop-example"], shipped) == key(FIXED["bop-example"], bop)
    variants = {key(FIXED["bop-example"]), key(FIXED["bop-default"]),
                key(FIXED["bop-example"], seed=1), key(FIXED["bop-example"], split="val")}
    assert len(variants) == 4


def test_resume_refuses_other_fingerprint_options(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"options": {"batch_size": 32, "evals": 10, "val_fraction": 0.1,
                                            "val_max": 5000}, "runs": []}))
    with pytest.raises(ValueError, match="batch_size"):
        suite.run_suite(SuiteOptions(cells=("digits-mlp@250",), output_dir=str(tmp_path)),
                        print_fn=None)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="`output_dir`"):
        suite.run_suite(SuiteOptions(cells=("digits-mlp@250",), output_dir=str(tmp_path)),
                        print_fn=None)


def test_merged_results_resummarise_without_training(tmp_path):
    opts = dict(cells=("digits-mlp@250",), seeds=1, steps_scale=0.02,
                optimizers=("fliplstm", "bop-example"))
    a, b = tmp_path / "a", tmp_path / "b"
    suite.run_suite(SuiteOptions(**opts, output_dir=str(a)), print_fn=None)
    opts2 = dict(opts, optimizers=("bop-default",))
    suite.run_suite(SuiteOptions(**opts2, output_dir=str(b)), print_fn=None)
    merged = tmp_path / "m"
    files = [str(a / "results.json"), str(b / "results.json")]
    assert suite.merge_results(files + files[:1], str(merged)) == 3
    result = suite.run_suite(SuiteOptions(**dict(opts, optimizers=(
        "fliplstm", "bop-example", "bop-default")), output_dir=str(merged)), print_fn=None)
    (cell,) = result.cells
    assert sorted(r.label for r in cell.rows) == ["bop-default", "bop-example", "fliplstm"]
    merged_json = json.loads((merged / "results.json").read_text())
    assert len(merged_json["runs"]) == 3  # nothing was trained again
    ran_on = [json.loads(open(f).read())["machine"] for f in files]
    distinct = [m for i, m in enumerate(ran_on) if m not in ran_on[:i]]
    assert merged_json["machines"] == distinct  # each part's machine kept, none added
    with pytest.raises(ValueError, match="exists"):
        suite.merge_results(files, str(merged))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"options": dict(json.loads(
        (a / "results.json").read_text())["options"], evals=3), "runs": []}))
    with pytest.raises(ValueError, match=r"other \['evals'\]"):
        suite.merge_results([files[0], str(other)], str(tmp_path / "m2"))
    with pytest.raises(ValueError, match="not a suite results file"):
        suite.merge_results([str(tmp_path / "missing.json")], str(tmp_path / "m3"))


# ---- the CLI: help and bad input ----------------------------------------------------
def test_bench_help_describes_the_suite(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens too
    for needle in ("task suite (--suite)", "--suite", "--cells A,B", "--steps-scale F",
                   "--evals N", "--bop-thresholds T,T", "--bop2nd-gammas G,G",
                   "with --suite: fliplstm,bop-default,bop-example,bop-tuned,bop2nd-paper,"
                   "bop2nd-tuned,adam-ste", "with --suite 3, 5 on digits-mlp",
                   "with --suite: kflip-suite", "MODEL@LENGTH"):
        assert needle.replace(" ", "") in text, needle


@pytest.mark.parametrize("argv", [
    ["bench", "--suite", "--cells", "nope"],
    ["bench", "--suite", "--seeds", "0"],
    ["bench", "--suite", "--steps-scale", "0"],
    ["bench", "--suite", "--bop-gammas", "a,b"],
])
def test_suite_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--suite", "--epochs", "3"], "--epochs do(es) not apply to --suite"),
    (["bench", "--suite", "--model=cnn"], "--model do(es) not apply to --suite"),
    (["bench", "--suite", "--optimizers", "bop"], "`optimizers`"),
    (["bench", "--suite", "--bop-gammas", "2"], "`bop_gammas`"),
    (["bench", "--cells", "cnn"], "--cells only appl(ies) with --suite"),
    (["bench", "--optimizers", "bop-tuned"], "`optimizers`"),
])
def test_suite_mistakes_are_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    assert cli.main(argv + ["--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
