"""Entry point of the ``kflip`` console script.

It lives outside the ``kflip`` package so that it can ask the package to defer its
TensorFlow imports (``KFLIP_DEFER_IMPORTS``) before the package is first imported:
``kflip --help`` and ``kflip --version`` then answer at once. :func:`kflip.cli.main`
loads the full API once a subcommand runs.
"""

import os
import sys


def main() -> int:
    os.environ["KFLIP_DEFER_IMPORTS"] = "1"
    from kflip import cli

    return cli.main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
