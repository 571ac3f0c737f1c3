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


def test_settings_doc_lists_every_setting_with_its_default():
    text = read("docs/settings.md")
    missing = [s.name for s in SETTINGS if s.name not in text]
    assert missing == []
    for setting in SETTINGS:
        section = text[text.index(setting.name) :][:600]
        assert repr(setting.default) in section or str(setting.default) in section, setting.name


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
