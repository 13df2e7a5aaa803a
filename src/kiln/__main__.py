"""``python -m kiln``: the ``kiln`` command (``kiln.cli.main``), for environments without the script."""

import sys

from kiln.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
