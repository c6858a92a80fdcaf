import sys

from flowloss.cli import main

sys.exit(main())
