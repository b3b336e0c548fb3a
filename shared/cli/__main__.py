"""``python -m shared.cli``: what the ``ofa-entail`` script runs."""

import sys

from shared.cli import main

sys.exit(main())
