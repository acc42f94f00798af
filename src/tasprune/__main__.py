"""``python -m tasprune``: the same command line as the ``tasprune`` console script."""

from tasprune.cli import main

raise SystemExit(main())
