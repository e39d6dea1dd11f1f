"""`python -m dobbin`: the same as the `dobbin` command."""

import sys

from dobbin.cli import main

sys.exit(main())
