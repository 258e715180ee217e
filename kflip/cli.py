"""The ``kflip`` command: ``train``, ``bench``, ``meta-train``, ``export``.

A thin argparse layer. ``train`` and ``bench`` call :func:`kflip.bench.train` and
:func:`kflip.bench.bench` (``bench --suite``: :func:`kflip.suite.run_suite`);
``meta-train`` and ``export`` are provided by :mod:`kflip.meta` and :mod:`kflip.export`
(``add_arguments(parser)`` + ``run(args)``), imported only when their command runs.

Exit codes: 0 success, 2 bad usage or input (argparse errors, invalid values, missing
or unreadable dataset and weights files, a subcommand not available in this version).
TensorFlow's C++ start-up log is off unless ``TF_CPP_MIN_LOG_LEVEL`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys

from kflip import suite_grid
from kflip._version import __version__

PLUGINS = {
    "meta-train": (
        "kflip.meta",
        "meta-train the FlipLSTM's weights on small tasks (kflip.meta)",
    ),
    "export": ("kflip.export", "export a trained model for inference (kflip.export)"),
}
_OPTIMIZERS = ("adam-ste", "bop", "fliplstm-gradient", "fliplstm")
_MODELS = ("mlp", "cnn", "binarynet", "resnet")
# the suite's names (kflip.suite_grid has no TensorFlow: --help stays instant)
_SUITE_OPTIMIZERS = suite_grid.OPTIMIZERS
_SUITE_MODELS = tuple(suite_grid.MODELS)
_SUITE_LENGTHS = suite_grid.LENGTHS
_SUITE_ONLY = ("--cells", "--steps-scale", "--evals", "--bop-thresholds", "--bop-gammas",
               "--bop2nd-thresholds", "--bop2nd-gammas")
# flags of `kflip bench` that --suite does not use (it fixes data, models and lengths)
_NOT_FOR_SUITE = ("--dataset", "--train-examples", "--test-examples", "--model", "--hidden",
                  "--filters", "--dense", "--width", "--epochs", "--eval-every",
                  "--bop-threshold", "--bop-gamma", "--greedy-examples", "--greedy-seconds",
                  "--greedy-option", "--greedy-after", "--no-greedy", "--timing-steps",
                  "--timing-rounds")


# ---- argument types ---------------------------------------------------------------
def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _finite_float(low: float, what: str, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_float = _finite_float(0.0, "a finite number > 0", low_open=True)
_nonneg_float = _finite_float(0.0, "a finite number >= 0")


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _float_list(text: str) -> tuple:
    parse = _nonneg_float
    values = tuple(parse(t) for t in text.split(",") if t.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _name_list(choices):
    def parse(text: str) -> list:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown name(s) {bad}; choose from {', '.join(choices)}"
            )
        return names

    return parse


def _key_value(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass  # a plain string
    return key.strip(), value


# ---- parsers ----------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        default="digits",
        help="digits (embedded, no network; default), mnist, fashion_mnist, cifar10 or any "
        "tensorflow-datasets name; without tfds data it reads DATA_DIR/<name>.npz or "
        "DATA_DIR/<name>/<name>.npz (arrays x_train, y_train, x_test, y_test)",
    )
    d.add_argument(
        "--data-dir",
        default=None,
        help="tfds data dir and .npz fallback root (default: $KFLIP_DATA_DIR)",
    )
    d.add_argument("--download", action="store_true", help="let tensorflow-datasets download")
    d.add_argument("--train-examples", type=_positive_int, default=None, metavar="N",
                   help="use only the first N training examples")
    d.add_argument("--test-examples", type=_positive_int, default=None, metavar="N",
                   help="use only the first N test examples")

    m = p.add_argument_group("model")
    m.add_argument("--model", choices=_MODELS, default="mlp",
                   help="BinaryNet MLP, larq MNIST tutorial CNN, BinaryNet CIFAR-10 VGG, binary ResNet (default mlp)")
    m.add_argument("--hidden", type=_int_list, default=None, metavar="N,N",
                   help="mlp hidden widths (default 512,512; 256,256 on digits)")
    m.add_argument("--filters", type=_int_list, default=None, metavar="N,N,N",
                   help="cnn conv filters (default 32,64,64)")
    m.add_argument("--dense", type=_positive_int, default=None, help="cnn dense width (default 64)")
    m.add_argument("--width", type=_positive_float, default=None,
                   help="binarynet width multiplier (default 1.0)")

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_positive_int, default=None,
                   help="default 6 (10 on digits)")
    t.add_argument("--batch-size", type=_positive_int, default=64, help="default 64")
    t.add_argument("--eval-every", type=_positive_int, default=None, metavar="K",
                   help="evaluate the test set every K steps (default: ~5 times per epoch)")
    t.add_argument("--bop-threshold", type=_nonneg_float, default=1e-6, help="Bop threshold (default 1e-6)")
    t.add_argument("--bop-gamma", type=_positive_float, default=1e-3, help="Bop gamma (default 1e-3)")
    t.add_argument("--lstm-weights", default=None, metavar="PATH",
                   help="FlipLSTM weights .npz (default: the weights shipped with kflip)")

    g = p.add_argument_group("greedy flip search")
    g.add_argument("--greedy-examples", type=_positive_int, default=1024, metavar="N",
                   help="probe set size: N training examples (default 1024)")
    g.add_argument("--greedy-seconds", type=_nonneg_float, default=10.0, metavar="S",
                   help="time budget per layer (greedy_flip max_seconds; default 10, 0 for none)")
    g.add_argument("--greedy-option", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="extra keyword for kflip.greedy_flip (JSON value; null drops a "
                   "default), repeatable, e.g. --greedy-option order=index "
                   "(defaults: order=gradient)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kflip",
        description="Flip optimizers for binarized neural networks (Keras + larq). "
        "Run `kflip bench` to compare optimizers on the embedded digits dataset.",
    )
    parser.add_argument("--version", action="version", version=f"kflip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser(
        "train",
        help="train one reference BNN with one optimizer",
        description="Train a reference BNN with one optimizer; saves OUTPUT/model.keras "
        "and OUTPUT/history.json.",
    )
    tr.add_argument("--optimizer", choices=_OPTIMIZERS, default="fliplstm",
                    help="default fliplstm")
    tr.add_argument("--greedy", action="store_true",
                    help="run the greedy flip search after training")
    tr.add_argument("--seed", type=_nonneg_int, default=0, help="default 0")
    tr.add_argument("--output", default=None, metavar="DIR",
                    help="default kflip-runs/<dataset>-<model>-<optimizer>-seed<seed>")
    tr.add_argument("--tensorboard", default=None, metavar="DIR", help="TensorBoard log dir")
    tr.add_argument("--quiet", action="store_true", help="no Keras progress bar")
    _add_common(tr)

    be = sub.add_parser(
        "bench",
        help="compare every optimizer on the same model, data and seeds",
        description="Same model, data, epochs and seeds under every optimizer; prints a "
        "table and writes OUTPUT/results.json, OUTPUT/accuracy_vs_step.png and "
        "OUTPUT/flip_rate.png. With no arguments: digits, MLP 256-256, 10 epochs, 5 seeds.",
    )
    be.add_argument("--optimizers", type=_name_list(_OPTIMIZERS + _SUITE_OPTIMIZERS[1:]),
                    default=None, metavar="A,B",
                    help=f"default {','.join(_OPTIMIZERS)}; with --suite: "
                    f"{','.join(_SUITE_OPTIMIZERS)}")
    be.add_argument("--greedy-after", type=_name_list(_OPTIMIZERS),
                    default=["fliplstm-gradient", "fliplstm"], metavar="A,B",
                    help="optimizers whose trained models also get a greedy flip search row "
                    "(default fliplstm-gradient,fliplstm; '' for none)")
    be.add_argument("--no-greedy", action="store_true", help="no greedy rows")
    be.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                    help="seeds 0..N-1 (default 5; with --suite 3, 5 on digits-mlp)")
    be.add_argument("--output", default=None, metavar="DIR",
                    help="default kflip-bench (with --suite: kflip-suite)")
    be.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    be.add_argument("--timing-steps", type=_positive_int, default=20,
                    help="steps per optimizer per timing round (default 20)")
    be.add_argument("--timing-rounds", type=_positive_int, default=10,
                    help="round-robin timing rounds (default 10)")
    _add_common(be)
    _add_suite(be)

    for name, (_, help_text) in PLUGINS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _add_suite(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group(
        "task suite (--suite)",
        "FlipLSTM against Bop (larq defaults, larq example, tuned), Bop2ndOrder (paper, "
        "tuned) and Adam+STE in cells of model x training steps; writes "
        "DIR/results.json, DIR/suite.md, DIR/heatmap.png; a rerun skips the runs "
        "DIR/results.json holds. Uses --seeds, --optimizers, --output, --no-plots, "
        "--batch-size, --lstm-weights, --data-dir (MNIST) and --download; not the "
        "dataset, model, epochs, Bop, greedy or timing options.",
    )
    s.add_argument("--suite", action="store_true", help="run the task suite (kflip.suite)")
    s.add_argument("--cells", type=_name_list(_suite_cell_names()), default=(),
                   metavar="A,B",
                   help="only these: models (" + ",".join(_SUITE_MODELS) + "), lengths ("
                   + ",".join(map(str, _SUITE_LENGTHS)) + ") or MODEL@LENGTH (default: all)")
    s.add_argument("--steps-scale", type=_positive_float, default=1.0, metavar="F",
                   help="multiply every length by F, for quick runs (default 1)")
    s.add_argument("--evals", type=_positive_int, default=10, metavar="N",
                   help="test evaluations per run besides step 0 (default 10)")
    s.add_argument("--bop-thresholds", type=_float_list, default=(1e-8, 1e-7, 1e-6),
                   metavar="T,T", help="bop-tuned grid (default 1e-8,1e-7,1e-6)")
    s.add_argument("--bop-gammas", type=_float_list, default=(1e-4, 1e-3, 1e-2),
                   metavar="G,G", help="bop-tuned grid (default 1e-4,1e-3,1e-2)")
    s.add_argument("--bop2nd-thresholds", type=_float_list, default=(1e-7, 1e-6, 1e-5),
                   metavar="T,T", help="bop2nd-tuned grid (default 1e-7,1e-6,1e-5)")
    s.add_argument("--bop2nd-gammas", type=_float_list, default=(1e-7, 1e-6, 1e-5),
                   metavar="G,G", help="bop2nd-tuned grid, sigma 1e-2 (default 1e-7,1e-6,1e-5)")


def _suite_cell_names() -> tuple:
    lengths = tuple(map(str, _SUITE_LENGTHS))
    return _SUITE_MODELS + lengths + tuple(f"{m}@{n}" for m in _SUITE_MODELS for n in lengths)


def _model_options(args) -> dict | None:
    options = {
        "mlp": {"hidden": args.hidden},
        "cnn": {"filters": args.filters, "dense": args.dense},
        "binarynet": {"width": args.width},
        "resnet": {},
    }[args.model]
    given = {k: v for k, v in options.items() if v is not None}
    wrong = [
        flag
        for flag, value in (("--hidden", args.hidden), ("--filters", args.filters),
                            ("--dense", args.dense), ("--width", args.width))
        if value is not None and flag.lstrip("-") not in options
    ]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do(es) not apply to --model {args.model}.")
    return given or None


def _common_kwargs(args) -> dict:
    return dict(
        model=args.model,
        model_options=_model_options(args),
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        data_dir=args.data_dir,
        download=args.download,
        n_train=args.train_examples,
        n_test=args.test_examples,
        bop_threshold=args.bop_threshold,
        bop_gamma=args.bop_gamma,
        lstm_weights=args.lstm_weights,
        greedy_examples=args.greedy_examples,
        greedy_options=_greedy_options(args),
    )


def _greedy_options(args) -> dict:
    options = {"max_seconds": args.greedy_seconds or None}
    options.update(dict(args.greedy_option))
    return options


def _cmd_train(args, argv) -> int:
    from kflip import bench as bench_lib

    output = args.output or os.path.join(
        "kflip-runs", f"{args.dataset}-{args.model}-{args.optimizer}-seed{args.seed}"
    )
    result = bench_lib.train(
        args.dataset,
        optimizer=args.optimizer,
        seed=args.seed,
        greedy=args.greedy,
        output_dir=output,
        tensorboard_dir=args.tensorboard,
        verbose=0 if args.quiet else 1,
        **_common_kwargs(args),
    )
    line = (
        f"{args.optimizer} on {result['dataset']} ({result['model']}): test accuracy "
        f"{100 * result['test_accuracy']:.2f}% after {result['epochs']} epochs "
        f"({result['steps']} steps, {result['fit_seconds']:.1f} s, "
        f"{result['flips_per_step']:.1f} flips/step)"
    )
    if "greedy" in result:
        g = result["greedy"]
        line += (
            f"; greedy flip search {100 * g['test_accuracy_before']:.2f}% -> "
            f"{100 * g['test_accuracy_after']:.2f}% in {g['seconds']:.1f} s"
        )
    print(line)
    print(f"saved {result['model_path']} and {result['history_path']}")
    return 0


def _cmd_suite(args, argv) -> int:
    from kflip import suite

    given = sorted({a.split("=")[0] for a in argv} & set(_NOT_FOR_SUITE))
    if given:
        raise ValueError(f"{', '.join(given)} do(es) not apply to --suite.")
    options = suite.SuiteOptions(
        cells=tuple(args.cells),
        seeds=args.seeds,
        steps_scale=args.steps_scale,
        optimizers=tuple(args.optimizers or suite.OPTIMIZERS),
        batch_size=args.batch_size,
        evals=args.evals,
        bop_thresholds=args.bop_thresholds,
        bop_gammas=args.bop_gammas,
        bop2nd_thresholds=args.bop2nd_thresholds,
        bop2nd_gammas=args.bop2nd_gammas,
        lstm_weights=args.lstm_weights,
        data_dir=args.data_dir,
        download=args.download,
        output_dir=args.output or "kflip-suite",
        plots=not args.no_plots,
    )
    suite.run_suite(options, print_fn=lambda line: print(line, flush=True))
    return 0


def _cmd_bench(args, argv) -> int:
    from kflip import bench as bench_lib

    if args.suite:
        return _cmd_suite(args, argv)
    suite_only = sorted({a.split("=")[0] for a in argv} & set(_SUITE_ONLY))
    if suite_only:
        raise ValueError(f"{', '.join(suite_only)} only appl(ies) with --suite.")
    greedy_after = [] if args.no_greedy else args.greedy_after
    bench_lib.bench(
        args.dataset,
        optimizers=args.optimizers or list(_OPTIMIZERS),
        greedy_after=greedy_after,
        seeds=args.seeds or 5,
        output_dir=args.output or "kflip-bench",
        plots=not args.no_plots,
        timing_steps=args.timing_steps,
        timing_rounds=args.timing_rounds,
        command=" ".join(["kflip"] + list(argv)),
        print_fn=lambda line: print(line, flush=True),
        **_common_kwargs(args),
    )
    return 0


def _run_plugin(command: str, rest: list) -> int:
    module_name, help_text = PLUGINS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(
                f"kflip {command}: not available in this version of kflip "
                f"({__version__}): the module {module_name} is missing.",
                file=sys.stderr,
            )
        else:
            print(f"kflip {command}: cannot import {module_name}: {e}", file=sys.stderr)
        return 2
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        print(
            f"kflip {command}: not available in this version of kflip: {module_name} "
            "has no add_arguments()/run().",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog=f"kflip {command}",
        description=help_text,
        formatter_class=_DefaultsFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return _guarded(command, lambda: module.run(args))


class _DefaultsFormatter(argparse.HelpFormatter):
    """Show ``(default: X)`` where the help text does not already say its default."""

    def _format_action(self, action):
        if action.help is None and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"  # options without help text too
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _guarded(command: str, run) -> int:
    """Run a command; a user's mistake is one line on stderr and exit code 2."""
    try:
        return int(run() or 0)
    except (ValueError, OSError) as e:
        print(f"kflip {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())


def _start_api() -> None:
    """Load kflip's API; TensorFlow's C++ start-up log stays out of the output unless
    ``TF_CPP_MIN_LOG_LEVEL`` is set below 3 (the user asked for it)."""
    os.environ.pop("KFLIP_DEFER_IMPORTS", None)
    level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import kflip

    if level.strip() in ("0", "1", "2"):
        kflip._load_all()
        return
    with _stderr_fd_silenced():  # the start-up lines are written before absl's log init
        import tensorflow as tf

        tf.config.list_physical_devices()  # device discovery (the cuInit lines) too
    kflip._load_all()


@contextlib.contextmanager
def _stderr_fd_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _api_missing(command: str) -> int | None:
    """Start the API; if TensorFlow or larq is not installed, say so in one line (2)."""
    try:
        _start_api()
    except ImportError as e:
        print(f"kflip {command}: error: {e.name or e} is not installed in this Python "
              f"({sys.executable}); install kflip with its dependencies: "
              "pip install kflip", file=sys.stderr)
        return 2
    return None


def main(argv=None) -> int:
    """Entry point of the ``kflip`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PLUGINS:
        code = _api_missing(argv[0])
        return code if code is not None else _run_plugin(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    code = _api_missing(args.command)
    if code is not None:
        return code
    handler = {"train": _cmd_train, "bench": _cmd_bench}[args.command]
    return _guarded(args.command, lambda: handler(args, argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
