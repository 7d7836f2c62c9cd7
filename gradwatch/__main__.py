"""``python -m gradwatch``: the same program as the ``gradwatch`` command."""

from gradwatch.cli import main

raise SystemExit(main())
