"""``python -m fastmid`` (and ``torchrun -m fastmid``) entry point."""

import sys

from fastmid.cli import main
from fastmid.errors import record_exit

code = main()
record_exit(code)
sys.exit(code)
