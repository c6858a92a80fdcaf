"""``python -m flowloss.adapters.openrlhf``: see `flowloss.adapters.openrlhf.launcher`."""

from flowloss.adapters.openrlhf.launcher import main

main()
