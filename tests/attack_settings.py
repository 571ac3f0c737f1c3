"""Settings of the daphne processes in the attack tier: the demo's, plus overrides.

``REALTIME_TEST_OVERRIDES`` (JSON object) sets module-level settings, so that each test server
can run with its own limits (tests/test_attacks.py).
"""

import json
import os

from project.settings import *  # noqa: F403

for _name, _value in json.loads(os.environ.get("REALTIME_TEST_OVERRIDES", "{}")).items():
    globals()[_name] = _value

ASGI_APPLICATION = "tests.attack_asgi.application"
