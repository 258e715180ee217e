"""``kflip meta-train``: the options of a run (derived from :class:`MetaConfig`) and
the options of running it (output, log, checkpoint, workers)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from kflip.meta.config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``kflip meta-train`` (defaults = the documented default run)."""
    p = parser
    p.add_argument("--out", default="learned.npz", help="output .npz (+ .json metadata)")
    p.add_argument("--log", default=None, help="meta-loss log, JSON lines (default: <out>.log.jsonl)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: <out>.ckpt.json)")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--workers", type=int, default=2, help="evaluation processes (1 = in-process)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this long")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p)
    return p


def run(args) -> int:
    """Run ``kflip meta-train`` with parsed ``args``; returns the exit code."""
    from kflip.meta.loop import meta_train

    config = config_from_args(args)
    stem = os.path.splitext(args.out)[0]
    log = args.log or stem + ".log.jsonl"
    ckpt = args.checkpoint or stem + ".ckpt.json"
    if not args.resume:
        for path in (log, ckpt):
            if os.path.exists(path):
                os.remove(path)
    w = meta_train(
        config,
        out=args.out,
        log=log,
        checkpoint=ckpt,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        workers=args.workers,
        max_minutes=args.max_minutes,
        quiet=args.quiet,
    )
    m = w.metadata
    print(
        f"wrote {stem}.npz/.json: best validation meta-loss {m['best_val_meta_loss']:.4f} "
        f"(init {m['init_val_meta_loss']:.4f}) at iteration {m['best_iteration']}, "
        f"{m['iterations_done']} iterations in {m['meta_training_time_s'] / 60:.1f} min",
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from kflip import meta

    parser = argparse.ArgumentParser(prog="kflip meta-train", description=meta.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
