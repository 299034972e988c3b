"""``python -m multitoken.cli`` runs as ``python -m multitoken`` does (cli.py took it once)."""

import sys

from multitoken.cli import main

sys.exit(main())
