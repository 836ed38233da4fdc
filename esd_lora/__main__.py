"""`python -m esd_lora` and `accelerate launch -m esd_lora train ...`."""

import sys

from .cli import main

sys.exit(main())
