"""``python -m edgesync``: the operator's command line (see ``edgesync._cli``)."""

import sys

from ._cli import main

sys.exit(main())
