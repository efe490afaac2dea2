"""`python -m dwave ...`: the same command line as `dwave ...` (where the script is not on PATH:
a job's environment, a venv not activated)."""

import sys

from .cli import main

sys.exit(main())
