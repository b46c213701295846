from genloss.apps.cli import main  # ``python -m genloss``: the genloss command

raise SystemExit(main())
