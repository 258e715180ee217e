"""Merge the results of several suite runs into one output directory.

A long suite is often run in parts, into separate output directories (two processes
must never share one). Merge their ``results.json`` files, then run the suite on the
merged directory with the union of the cells: every run is found, nothing trains,
and all cells come out in one table, tally and heat-map:

    python benchmarks/suite_merge.py MERGED A/results.json B/results.json
    kflip bench --suite --cells digits-mlp,mlp2x512 --output MERGED

(``kflip.suite.merge_results``; the files must share batch size, evaluations and
validation split, and a run held by several files is taken from the first.)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from kflip import suite  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output_dir", help="a new directory for the merged results.json")
    p.add_argument("results", nargs="+", help="results.json files of suite runs")
    args = p.parse_args(argv)
    try:
        n = suite.merge_results(args.results, args.output_dir)
    except ValueError as e:
        print(f"suite_merge.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{n} runs from {len(args.results)} file(s) -> {args.output_dir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
