"""The demo project's settings with the per-client abuse limits lifted for the benchmark.

Every benchmark client connects from 127.0.0.1 as one of a few hundred users and sends far
faster than a person, so the connection caps and frame/send rates that protect a public
deployment would refuse the load itself. The limiters still run (their cost is measured);
only their thresholds are out of reach. Everything else is project.settings as shipped.
"""

from __future__ import annotations

from project.settings import *  # noqa: F403

REALTIME_MAX_CONNECTIONS_PER_USER = 1_000_000
REALTIME_MAX_CONNECTIONS_PER_IP = 1_000_000
REALTIME_FRAME_RATE = "1000000/1s"
REALTIME_SEND_RATE = "1000000/1s"
