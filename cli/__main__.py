"""``python -m cli``: the ``dermq`` command without its console script."""

from cli.main import main

raise SystemExit(main())
