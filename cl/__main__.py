"""``python -m cl`` runs the CLI."""

import sys

from cl.cli import main

sys.exit(main())
