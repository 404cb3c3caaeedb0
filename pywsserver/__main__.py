"""``python -m pywsserver``: run a server from the command line."""

import sys

from ._cli import main

sys.exit(main())
