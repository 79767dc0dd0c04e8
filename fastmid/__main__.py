"""``python -m fastmid`` (and ``torchrun -m fastmid``) entry point."""

import sys

from fastmid.cli import main

sys.exit(main())
