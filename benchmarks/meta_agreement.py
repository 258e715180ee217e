"""How much of a meta-gradient estimate is signal: cosines between independent draws.

Takes the ``kflip meta-train`` flags that define a run (families, pairs, lengths,
init, ...) and estimates the gradient ``--draws`` times at the run's starting point
(draw 0 is the run's first step), with ``kflip.meta.gradient_agreement``. The mean
cosine between two draws estimates the squared cosine between one draw and the true
gradient:

    python benchmarks/meta_agreement.py --init run3 --families mlp784-128,cnn-8-8,res-8 \\
        --min-horizon 300 --horizon 3000 --baseline bop --pairs 16 --train-examples 16384 \\
        --draws 4 --json agreement.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from kflip.meta import config as config_lib  # noqa: E402
from kflip.meta import gradient_agreement  # noqa: E402
from kflip._files import write_json  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config_lib.add_config_arguments(p)
    p.add_argument("--draws", type=int, default=4, help="independent estimates (>= 2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None, help="write the config and the cosines here")
    args = p.parse_args(argv)
    try:
        config = config_lib.config_from_args(args)
        t0 = time.time()
        cos = gradient_agreement(config, draws=args.draws, workers=args.workers)
    except ValueError as e:
        print(f"meta_agreement.py: error: {e}", file=sys.stderr)
        return 2
    off = cos[~np.eye(len(cos), dtype=bool)]
    print(np.array2string(cos, precision=3))
    print(f"mean cosine between draws {off.mean():+.3f} (min {off.min():+.3f}, max {off.max():+.3f}); "
          f"{time.time() - t0:.0f} s")
    if args.json:
        write_json(args.json, {"config": config.to_dict(), "draws": args.draws,
                               "cosines": cos.tolist(), "mean_cosine": float(off.mean()),
                               "seconds": time.time() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
