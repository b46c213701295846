"""``python -m genloss``: the genloss command (see genloss.cli)."""

from .cli import main

raise SystemExit(main())
