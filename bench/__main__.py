"""``python -m bench``: see bench/run.py and docs/performance.md."""

from __future__ import annotations

import sys

from bench.run import main
from tests.servers import ServerError

try:
    sys.exit(main())
except ServerError as exc:  # a server, Redis, PostgreSQL or a checkout that would not start
    print(f"bench: {exc}", file=sys.stderr)
    sys.exit(1)
