"""``python -m handoff``: the same as the ``handoff`` command."""

from __future__ import annotations

from handoff.cli import main

raise SystemExit(main())
