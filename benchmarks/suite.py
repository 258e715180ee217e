"""The task suite: ``kflip bench --suite`` (kflip.suite), runnable as a script.

Every argument goes to ``kflip bench --suite``; see docs/suite.md. The full suite on
MNIST (cells of 5 models x 250 / 1,500 / 6,000 steps, 3 seeds, 5 on digits):

    python benchmarks/suite.py --data-dir ../shared/data --output benchmarks/results/suite

A rerun with the same ``--output`` continues it (finished runs are skipped). Quick
look on digits only:

    python benchmarks/suite.py --cells digits-mlp --steps-scale 0.2 --output /tmp/suite
"""

from __future__ import annotations

import os
import sys

os.environ["KFLIP_DEFER_IMPORTS"] = "1"  # as the console script: TensorFlow starts quietly

from kflip import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "--suite", *sys.argv[1:]]))
