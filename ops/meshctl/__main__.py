"""`python -m ops.meshctl ...`: the same as the `meshctl` command."""

import sys

from ops.meshctl import main

if __name__ == "__main__":   # not when multiprocessing re-imports the main module (`meshctl up`'s agents)
    sys.exit(main())
