"""store.AutoPipeline: commands of one loop turn share a round trip, each answered alone."""

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from realtime.store import AutoPipeline

from .servers import running_redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("store-redis")) as server:
        yield server.url


@pytest.fixture
async def client(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


async def test_commands_issued_together_go_as_one_pipeline_in_order(client):
    pipeline = AutoPipeline(client)
    replies = await asyncio.gather(*(pipeline.execute("INCR", "n") for _ in range(20)))
    assert replies == list(range(1, 21))
    assert pipeline.flushes == 1


async def test_a_lone_command_is_sent_at_once(client):
    pipeline = AutoPipeline(client)
    assert await pipeline.execute("SET", "k", "v") is True
    assert await pipeline.execute("GET", "k") == b"v"
    assert pipeline.flushes == 2


async def test_a_failing_command_fails_only_its_caller(client):
    pipeline = AutoPipeline(client)
    await client.set("text", "not a number")
    results = await asyncio.gather(
        pipeline.execute("INCR", "n"),
        pipeline.execute("INCR", "text"),
        pipeline.execute("INCR", "n"),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)
    assert pipeline.flushes == 1


async def test_a_lone_failing_command_raises_to_its_caller(client):
    pipeline = AutoPipeline(client)
    await client.set("text", "not a number")
    with pytest.raises(ResponseError):
        await pipeline.execute("INCR", "text")
    assert await pipeline.execute("INCR", "n") == 1  # the pipeline still works


async def test_commands_queued_during_a_flush_go_in_the_next_one(client):
    pipeline = AutoPipeline(client)
    first = asyncio.ensure_future(pipeline.execute("INCR", "n"))
    for _ in range(100):  # until the flush of the first has taken it and waits for Redis
        if pipeline.flushes == 1 and pipeline._queue == []:
            break
        await asyncio.sleep(0)
    assert pipeline._queue == [] and pipeline.flushes == 1
    later = [asyncio.ensure_future(pipeline.execute("INCR", "n")) for _ in range(5)]
    assert await first == 1
    assert sorted(await asyncio.gather(*later)) == [2, 3, 4, 5, 6]
    assert pipeline.flushes == 2


async def test_an_unreachable_redis_fails_every_caller_with_the_error(redis_url):
    from .servers import free_port

    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    pipeline = AutoPipeline(dead)
    results = await asyncio.gather(
        *(pipeline.execute("INCR", "n") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionError) or "connect" in str(r).lower() for r in results)
    await dead.aclose()
