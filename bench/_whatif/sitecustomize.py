"""Applies bench/whatif.py's patches named in $GEMBATCH_BENCH_PATCH at interpreter start
(only in processes a bench script starts with bench/_whatif on PYTHONPATH)."""

import os
import sys

if os.environ.get("GEMBATCH_BENCH_PATCH"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import whatif

    whatif.apply(os.environ["GEMBATCH_BENCH_PATCH"])
