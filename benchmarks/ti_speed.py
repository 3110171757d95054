"""The textual-inversion benchmark's old name: `train_speed.py --methods ti` (kept so that the commands quoted in
docs/benchmarks.md still run)."""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    if "--methods" not in sys.argv:
        sys.argv += ["--methods", "ti"]
    runpy.run_path(str(Path(__file__).with_name("train_speed.py")), run_name="__main__")
