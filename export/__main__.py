"""`python -m export MODEL.keras --out DIR ...` (see `export.cli`)."""

import sys

from export.cli import main

sys.exit(main())
