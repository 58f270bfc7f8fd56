"""`python -m service.cli` runs the `ratebench` command."""

import sys

from service.cli import main

sys.exit(main())
