"""Two FlipLSTM weights in one suite run, paired seed by seed, cell by cell.

Run the suite's FlipLSTM rows with each weights file into the same output directory
(the baselines are trained once and reused), then compare:

    kflip bench --suite --cells digits-mlp --output DIR                       # shipped
    kflip bench --suite --cells digits-mlp --optimizers fliplstm --lstm-weights NEW.npz --output DIR
    python benchmarks/suite_compare.py DIR/results.json NEW.npz default

Prints a Markdown table: mean test accuracy of each and ``a - b`` with its 95%
interval (``default`` or another shipped name for the weights in kflip/weights).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from kflip import suite  # noqa: E402
from kflip.suite_report import compare_weights  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a suite's results.json")
    p.add_argument("a", help="weights a (.npz or a shipped name)")
    p.add_argument("b", help="weights b (.npz or a shipped name)")
    args = p.parse_args(argv)
    with open(args.results) as f:
        runs = json.load(f)["runs"]
    print(f"a = {args.a}, b = {args.b}")
    print(compare_weights(runs, suite.weights_id(args.a), suite.weights_id(args.b)))


if __name__ == "__main__":
    main()
