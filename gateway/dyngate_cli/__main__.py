"""`python -m dyngate_cli ...` runs the `dyngate` command."""

import sys

from dyngate_cli import main

sys.exit(main())
