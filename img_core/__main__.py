"""`python -m img_core ...`: see img_core/cli.py."""

import sys

from img_core.cli.main import main

sys.exit(main())
