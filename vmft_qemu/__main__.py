"""`python -m vmft_qemu` is the `vmft` command."""

import sys

from .cli import main

sys.exit(main())
