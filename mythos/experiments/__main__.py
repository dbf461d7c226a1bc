"""``python -m mythos.experiments {depth,act-scan,vs-dense} --out DIR``."""

import sys

from .cli import main

sys.exit(main())
