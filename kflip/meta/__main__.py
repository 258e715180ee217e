"""``python -m kflip.meta`` is ``kflip meta-train``."""

import sys

from kflip.meta.cli import main

sys.exit(main())
