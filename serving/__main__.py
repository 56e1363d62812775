"""`python -m serving`: see serving/server/cli.py."""

import sys

from serving.server.cli import main

sys.exit(main())
