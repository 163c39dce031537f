"""``python -m crispedit ...`` and ``torchrun --nproc-per-node N -m crispedit curvature ...``."""

import sys

from .cli import main

sys.exit(main())
