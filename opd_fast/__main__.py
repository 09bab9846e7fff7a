"""`python -m opd_fast ...` is `opd-fast ...` (e.g. under torchrun)."""

import runpy

runpy.run_module("opd_fast.cli", run_name="__main__", alter_sys=True)
