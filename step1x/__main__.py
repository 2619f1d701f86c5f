"""``python -m step1x {edit,selftest,download}``."""

import sys

from .cli import main

sys.exit(main())
