"""``python -m eagle3_target.cli``: the same as the ``eagle3-target`` command."""

import sys

from eagle3_target.cli import main

sys.exit(main())
