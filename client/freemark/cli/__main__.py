"""`python -m freemark.cli`: the `freemark` command."""

import sys

from freemark.cli import main

sys.exit(main())
