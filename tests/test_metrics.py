import os
import re
import subprocess
import sys

import pytest
from asgiref.sync import sync_to_async
from prometheus_client import generate_latest

from realtime import metrics

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("hub")]


def sample(text, name, **labels):
    """The value of one sample in Prometheus text, or 0.0."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else "") + r" (\S+)"
    match = re.search("^" + pattern + "$", text, re.M)
    return float(match.group(1)) if match else 0.0


def scrape(client):
    response = client.get("/realtime/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return response.content.decode()


@pytest.fixture
def staff(client, users):
    client.force_login(users["staff"])
    return client


async def test_metrics_count_what_happens(staff, connect, users, rooms):
    before = await sync_to_async(scrape)(staff)
    alice = await connect(users["alice"])
    await alice.join("lobby")
    await alice.request(type="send", room="lobby", ref="s", payload={"text": "x"})
    await alice.messages(1)
    await alice.comm.send_to(text_data="not json")
    await alice.recv()
    after = await sync_to_async(scrape)(staff)

    def grew(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("realtime_connections") == 1
    assert grew("realtime_joins_total") == 1
    assert grew("realtime_frames_in_total", type="send") == 1
    assert grew("realtime_frames_in_total", type="invalid") == 1
    assert grew("realtime_frames_out_total", type="message") == 1
    assert grew("realtime_frames_out_total", type="ack") == 2
    assert grew("realtime_errors_total", code="bad_frame") == 1
    assert grew("realtime_messages_persisted_total") == 1
    assert grew("realtime_publish_seconds_count") == 1


def test_metrics_need_staff_or_token(client, users, settings):
    assert client.get("/realtime/metrics").status_code == 403
    client.force_login(users["alice"])
    response = client.get("/realtime/metrics")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    settings.REALTIME_METRICS_TOKEN = "s3cret"
    client.logout()
    assert client.get("/realtime/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/realtime/metrics", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200


def test_metrics_refuse_post(staff):
    assert staff.post("/realtime/metrics").status_code == 405


def test_frame_type_reads_encoded_frames():
    assert metrics.frame_type('{"type":"ack","ref":"1"}') == "ack"
    assert metrics.frame_type("garbage") == "unknown"


def test_multiprocess_collector_sums_processes(tmp_path, monkeypatch):
    """Two processes writing to one PROMETHEUS_MULTIPROC_DIR are reported as one sum."""
    script = (
        "import django; django.setup()\n"
        "from realtime import metrics\n"
        "metrics.MESSAGES_PERSISTED.inc(3)\n"
        "metrics.CONNECTIONS.inc(2)\n"
        "print('ready', flush=True)\n"
        "import sys; sys.stdin.readline()\n"  # stay alive: live gauges count live processes
    )
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for worker in workers:
            assert worker.stdout.readline() == "ready\n", worker.stderr.read()
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        text = generate_latest(metrics._registry()).decode()
        assert sample(text, "realtime_messages_persisted_total") == 6
        assert sample(text, "realtime_connections") == 4
    finally:
        for worker in workers:
            worker.communicate("\n", timeout=30)
