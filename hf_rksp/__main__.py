import sys

from hf_rksp.cli.commands import main

sys.exit(main())
