"""``python -m hf_rksp``: the command line, as ``hf-rksp``."""

import sys

from hf_rksp.cli.commands import main

sys.exit(main())
