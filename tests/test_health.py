"""GET /healthz: per-dependency status, 503 naming what fails (realtime/health.py)."""

from __future__ import annotations

import asyncio

import pytest
from django.db.utils import OperationalError

from realtime import drain, health

pytestmark = pytest.mark.django_db(transaction=True)


async def get(async_client, method="get"):
    response = await getattr(async_client, method)("/healthz")
    return response.status_code, response.json(), response


async def test_ok_when_database_and_layer_answer(async_client):
    status, body, response = await get(async_client)
    assert status == 200, body
    assert body["status"] == "ok" and body["failing"] == []
    assert body["checks"]["database"]["status"] == "ok"
    assert body["checks"]["channel_layer"]["status"] == "ok"
    assert body["checks"]["process"] == {"status": "ok", "connections": drain.live_count()}
    assert response["Cache-Control"] == "no-store"


async def test_database_failure_is_named(async_client, monkeypatch):
    def broken():
        raise OperationalError("could not connect to server: secret-host:5432")

    monkeypatch.setattr(health, "_ping_database", broken)
    status, body, _ = await get(async_client)
    assert status == 503 and body["failing"] == ["database"], body
    assert body["checks"]["database"] == {"status": "error", "error": "OperationalError"}
    assert "secret-host" not in str(body)  # the class names the fault, no addresses
    assert body["checks"]["channel_layer"]["status"] == "ok"


async def test_channel_layer_failure_is_named(async_client, monkeypatch):
    async def broken():
        raise ConnectionError("redis at 10.0.0.5:6379 refused")

    monkeypatch.setattr(health, "_channel_layer", broken)
    status, body, _ = await get(async_client)
    assert status == 503 and body["failing"] == ["channel_layer"], body
    assert body["checks"]["channel_layer"]["error"] == "ConnectionError"


async def test_a_hung_dependency_reports_instead_of_hanging(async_client, monkeypatch):
    async def hangs():
        await asyncio.sleep(3600)

    monkeypatch.setattr(health, "PROBE_TIMEOUT", 0.2)
    monkeypatch.setattr(health, "_channel_layer", hangs)
    async with asyncio.timeout(10):
        status, body, _ = await get(async_client)
    assert status == 503 and body["failing"] == ["channel_layer"], body
    assert body["checks"]["channel_layer"]["error"].startswith("no answer within")


async def test_draining_process_answers_503(async_client, monkeypatch):
    monkeypatch.setattr(drain, "_draining", True)
    status, body, _ = await get(async_client)
    assert status == 503 and body["failing"] == ["process"], body
    assert body["checks"]["process"]["status"] == "draining"


async def test_other_methods_are_refused(async_client):
    status, body, response = await get(async_client, "post")
    assert status == 405 and response["Allow"] == "GET, HEAD", body
