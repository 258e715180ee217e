"""Compare flip optimizers on scikit-learn's digits from Python (what `kflip bench` runs).

    python examples/bench_digits.py            # ~1-3 min on 2 CPU cores

Trains the same small binarized MLP with Adam+STE, Bop and FlipLSTM (one seed, three
epochs), prints the table, then looks at one run's test-accuracy curve and flip
counts. `kflip bench` with no arguments is the bigger version of this (all four
optimizers, greedy rows, 2 seeds, 10 epochs, plots).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402,F401  (selects Keras 2 before TensorFlow)
from kflip import bench  # noqa: E402


def main():
    results = bench.bench(
        "digits",
        model="mlp",
        model_options={"hidden": (128, 128)},
        optimizers=["adam-ste", "bop", "fliplstm"],
        greedy_after=[],  # add "fliplstm" for a greedy-flip-search row
        seeds=1,
        epochs=3,
        output_dir="kflip-bench-example",  # results.json + two PNGs
    )
    run = next(r for r in results["runs"] if r["optimizer"] == "fliplstm")
    print("\nFlipLSTM test accuracy vs step:")
    for point in run["test_curve"]:
        print(f"  step {point['step']:4d}: {100 * point['test_accuracy']:.2f}%")
    print("flips per binary layer:", run["flips"])


if __name__ == "__main__":
    main()
