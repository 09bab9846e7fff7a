"""`python -m opd_fast.cli ...` is `opd-fast ...` (so is `python -m opd_fast`)."""

import sys

from opd_fast.cli import main

sys.exit(main())
