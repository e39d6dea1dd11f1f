"""`python -m bench`: see bench/__init__.py."""

import sys

from bench.runner import main

sys.exit(main(sys.argv[1:]))
