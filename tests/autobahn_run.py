"""Run kosoku's Autobahn cases against a URL; print one JSON line per case.

A separate process on purpose: kosoku puts shim modules (an ``autobahn`` among them) on
``sys.path``, which clash with the real autobahn that daphne imports into the test process.

    python tests/autobahn_run.py URL EXCLUDE_FILE
"""

import asyncio
import json
import os
import sys


def excluded(path):
    cases = []
    with open(path) as fh:
        for line in fh:
            case = line.split("#", 1)[0].strip()
            if case:
                cases.append(case)
    return cases


async def main(url, exclude_file):
    import kosoku

    try:
        results = await kosoku.run_fuzzingclient(url, None, excluded(exclude_file), concurrency=2)
    except kosoku.FailureError as failure:
        results = failure.results
    for r in results:
        row = {
            "case": r.case_id,
            "passed": r.passed,
            "behavior": r.behavior.value,
            "close": r.behavior_close.value,
            "result": r.result,
            "result_close": r.result_close,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
    # Every result is printed and flushed. kosoku's native runtime can abort while the
    # interpreter finalizes ("Fatal Python error: Aborted" with no Python frame, about one
    # run in five when the server answers fast), so skip finalization: nothing is left to do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
