"""``python -m bench.fuzz``: see `bench.fuzz.cli`."""

from .cli import main

raise SystemExit(main())
