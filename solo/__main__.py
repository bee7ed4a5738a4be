"""`python -m solo ...` is the `solo` command."""

import sys

from solo.cli import main

sys.exit(main())
