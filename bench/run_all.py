"""Run every benchmark script in bench/ and report which targets held.

Each script prints its figure, the bound it is compared with (measured in the same run)
and the ratio, and exits non-zero when its target is missed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(p for p in HERE.glob("bench_*.py"))
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        code = subprocess.call([sys.executable, str(script), *sys.argv[1:]])
        if code != 0:
            failed.append(script.name)
        print(flush=True)
    if failed:
        print(f"targets missed: {', '.join(failed)}")
        return 1
    print(f"all {len(scripts)} benchmark targets held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
