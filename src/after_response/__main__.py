"""``python -m after_response dead-letters ...``: see :mod:`after_response._cli`."""

from ._cli import main

raise SystemExit(main())
