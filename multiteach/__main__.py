"""``python -m multiteach`` runs the command line."""

import sys

from multiteach.cli import main

sys.exit(main())
