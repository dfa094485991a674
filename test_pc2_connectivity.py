#!/usr/bin/env python3
"""Can MainPC and PC2 work together? Checks every link from this host to the other (ops/connectivity/).

    python3 test_pc2_connectivity.py                 # on MainPC (config/mainpc.yaml)
    python3 test_pc2_connectivity.py --from pc2      # on PC2 (config/pc2.yaml)
    python3 test_pc2_connectivity.py --json          # machine-readable report

Not a pytest module (despite its name): pytest's testpaths is tests/, and nothing here is named test_*.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

try:
    from ops.connectivity import main  # found beside this file: Python puts the script's folder on sys.path
except ImportError as missing:
    # Run by a Python without the project's dependencies (the system python3 has no pyzmq): run this file
    # again with the repository's .venv/bin/python, which has them. Re-executing keeps that interpreter
    # whole (its own site-packages, compiled for its own Python version) where adding .venv's
    # site-packages to this one's sys.path would mix the two.
    venv = HERE / ".venv"
    if (venv / "bin" / "python").exists() and Path(sys.prefix).resolve() != venv.resolve():
        os.execv(venv / "bin" / "python", [str(venv / "bin" / "python"), str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.exit(f"{missing}: run this with the project's Python (.venv/bin/python {Path(__file__).name}; "
             f"`scripts/run` or `scripts/test` sets .venv up)")

if __name__ == "__main__":
    sys.exit(main(root=HERE))
