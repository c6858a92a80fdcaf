"""``python -m flowloss``: the ``flowloss`` command line (`flowloss.cli`)."""

import sys

from flowloss.cli import main

if __name__ == "__main__":  # importing the module (docs tools, test collectors) must not run the CLI
    sys.exit(main())
