"""`python -m gateloop ...` (and `torchrun -m gateloop ...`) runs the command line."""

import sys

from .cli import main

sys.exit(main())
