"""``python -m mythos.train``: see :mod:`mythos.train.cli`."""

import sys

from .cli import main

sys.exit(main())
