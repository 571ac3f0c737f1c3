"""Facts that span files: docs list every check and setting; realtime.js matches protocol.py."""

import json
import re
from pathlib import Path

from realtime import checks, protocol
from realtime.conf import SETTINGS

ROOT = Path(__file__).resolve().parent.parent


def read(path):
    return (ROOT / path).read_text(encoding="utf-8")


def test_checks_doc_lists_every_check_id():
    text = read("docs/checks.md")
    assert [cid for cid in checks.CHECK_IDS if cid not in text] == []


def test_every_check_id_used_in_code_is_declared():
    used = set(re.findall(r'id="(realtime\.[EW]\d{3})"', read("realtime/checks.py")))
    assert used == set(checks.CHECK_IDS)


def settings_rows():
    """{setting: (default cell, description cell)} of the table in docs/settings.md."""
    rows = {}
    for line in read("docs/settings.md").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("REALTIME_"):
            assert cells[0] not in rows, f"{cells[0]} has two rows"
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_settings_doc_lists_every_setting_with_its_default():
    rows = settings_rows()
    assert sorted(rows) == sorted(s.name for s in SETTINGS)
    for setting in SETTINGS:
        documented = rows[setting.name][0]
        expected = json.dumps(setting.default) if isinstance(setting.default, str) else None
        assert documented in {str(setting.default), expected}, setting.name


def test_settings_doc_states_the_bounds_that_check_e003_enforces():
    rows = settings_rows()
    for name, (kind, minimum) in checks._NUMERIC.items():
        description = rows[name][1]
        assert f"Minimum {minimum}." in description or f"Minimum {minimum};" in description, name
        takes_float = float in (kind if isinstance(kind, tuple) else (kind,))
        assert ("int or float" in description) == takes_float, name


def test_protocol_doc_has_an_example_of_every_frame_type():
    text = read("docs/protocol.md")
    for kind in [*protocol.ClientType, *protocol.ServerType]:
        assert f'"type": "{kind}"' in text or f'"type":"{kind}"' in text, kind
    for code in protocol.ErrorCode:
        assert f"`{code}`" in text, code
    for close in protocol.CloseCode:
        assert str(int(close)) in text, close


def js_protocol():
    source = read("realtime/static/realtime/realtime.js")
    match = re.search(r"/\* protocol:begin \*/(.*?)/\* protocol:end \*/", source, re.S)
    assert match, "realtime.js lacks the protocol:begin/end markers"
    return json.loads(match.group(1))


def test_js_constants_equal_protocol_py():
    js = js_protocol()
    assert js["version"] == protocol.PROTOCOL_VERSION
    assert sorted(js["clientTypes"]) == sorted(t.value for t in protocol.ClientType)
    assert sorted(js["serverTypes"]) == sorted(t.value for t in protocol.ServerType)
    assert sorted(js["errorCodes"]) == sorted(c.value for c in protocol.ErrorCode)
    assert js["closeCodes"] == {c.name: c.value for c in protocol.CloseCode}


def test_repo_has_no_machine_paths():
    offenders = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in {".venv", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"}:
            continue
        if path.suffix not in {".py", ".md", ".html", ".js", ".toml", ".txt"}:
            continue
        if path.is_file() and "/" + "work/" in path.read_text(encoding="utf-8", errors="replace"):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_readme_install_summary_uses_the_lines_of_the_installation_guide():
    readme = read("README.md")
    section = readme.split("## Add realtime to your existing project", 1)[1].split("\n## ", 1)[0]
    guide = read("docs/installation.md")
    blocks = re.findall(r"^```python\n(.*?)^```$", section, re.M | re.S)
    assert blocks
    lines = [line for block in blocks for line in block.splitlines()]
    code = [line for line in lines if line.strip() and not line.startswith("#")]
    assert [line for line in code if line not in guide] == []
    commands = re.findall(r"`((?:pip|python|daphne) [^`]+)`", section)
    assert commands and [c for c in commands if c not in guide] == []
