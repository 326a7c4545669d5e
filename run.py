"""graphcache's command line from a checkout: ``python run.py --help`` (installed: ``graphcache``)."""

import sys

from graphcache._cli import main

if __name__ == "__main__":
    sys.exit(main())
