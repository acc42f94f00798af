"""``python -m tasprune.cli`` (as torchrun launches it): the ``tasprune`` command line."""

from tasprune.cli import main

raise SystemExit(main())
