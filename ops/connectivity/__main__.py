"""python -m ops.connectivity: the same as test_pc2_connectivity.py."""

import sys

from ops.connectivity.cli import main

if __name__ == "__main__":  # not when re-imported as __mp_main__ by a multiprocessing child
    sys.exit(main())
