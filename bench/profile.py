"""py-spy under load: sample server processes and keep the top frames (self and inclusive)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from tests.servers import REPO_ROOT, VENV_BIN

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    path = VENV_BIN / "py-spy"
    return str(path) if path.exists() else shutil.which("py-spy")


def start(
    pids: list[int], seconds: float, outdir: Path, label: str
) -> list[subprocess.Popen[bytes]]:
    """One ``py-spy record`` (raw collapsed stacks) per pid, for ``seconds``."""
    binary = py_spy()
    if binary is None:
        return []
    outdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid in pids:
        argv = [binary, "record", "--format", "raw", "--rate", "200", "--nonblocking"]
        if os.environ.get("BENCH_PYSPY_GIL") == "1":
            argv.append("--gil")  # only the thread holding the GIL: close to CPU time
        argv += ["--duration", str(max(1, int(seconds))), "--pid", str(pid)]
        argv += ["--output", str(profile_path(outdir, label, pid))]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def profile_path(outdir: Path, label: str, pid: int) -> Path:
    """py-spy's collapsed stacks (flamegraph.pl and speedscope read them)."""
    return outdir / f"profile-{label}-{pid}.folded"


def finish(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", f"{REPO_ROOT}/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def summarise(files: list[Path], top: int = 15) -> dict[str, Any]:
    """Top frames by own samples and by inclusive samples over the collapsed-stack files."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")]
            frames = [f for f in frames if not f.startswith("thread ")]
            if not frames:
                continue
            total += count
            own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count

    def pct(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": frame, "percent": round(100 * n / total, 1)}
            for frame, n in counter.most_common(top)
        ]

    return {"samples": total, "own": pct(own), "inclusive": pct(inclusive)}
