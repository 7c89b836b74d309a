"""`python -m demos`: see `demos.cli`."""

import sys

from .cli import main

sys.exit(main())
