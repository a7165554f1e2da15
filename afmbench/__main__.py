"""``python -m afmbench`` is the ``afmbench`` command."""

import sys

from afmbench.cli import main

sys.exit(main())
