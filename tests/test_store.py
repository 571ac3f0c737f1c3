"""store.AutoPipeline: commands of one loop turn share a round trip, each answered alone."""

import asyncio
import contextlib

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


async def test_one_kept_connection_serves_every_flush(client):
    pool = client.connection_pool
    checkouts = []
    take = pool.get_connection

    async def counting_get_connection(*args, **kwargs):
        checkouts.append(args)
        return await take(*args, **kwargs)

    pool.get_connection = counting_get_connection
    pipeline = AutoPipeline(client)
    for n in range(1, 6):
        assert await pipeline.execute("INCR", "n") == n
    assert await asyncio.gather(*(pipeline.execute("INCR", "n") for _ in range(3))) == [6, 7, 8]
    assert pipeline.flushes == 6 and len(checkouts) == 1


async def test_a_flush_cut_off_mid_reply_leaves_nothing_unread_for_the_next(client):
    from realtime import store

    pipeline = AutoPipeline(client)
    waiting = asyncio.ensure_future(pipeline.execute("BLPOP", "nothing-here", 1))
    for _ in range(100):  # until the flush has sent it and waits for the reply
        if pipeline._queue == [] and store._flush_tasks:
            break
        await asyncio.sleep(0)
    (flush,) = store._flush_tasks
    await asyncio.sleep(0.05)
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # Had the connection been kept as it was, this would read BLPOP's late (nil) reply.
    assert await pipeline.execute("INCR", "n") == 1
    assert await pipeline.execute("INCR", "n") == 2


@contextlib.asynccontextmanager
async def _pipeline_across_a_restart(tmp_path):
    """An AutoPipeline that has used its connection once; ``restart()`` restarts Redis empty."""
    from .servers import restart_redis_empty

    with running_redis(tmp_path / "redis") as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            pipeline = AutoPipeline(client)
            assert await pipeline.execute("INCR", "n") == 1

            def restart():
                server.process.stop()
                restart_redis_empty(server, tmp_path / "redis-again")

            yield pipeline, restart
        finally:
            await client.aclose()


async def test_a_restarted_redis_is_reconnected_without_failing_a_caller(tmp_path):
    async with _pipeline_across_a_restart(tmp_path) as (pipeline, restart):
        restart()
        # The kept connection belongs to the old server: replaced, and nobody fails.
        assert await pipeline.execute("INCR", "n") == 1
        assert await pipeline.execute("INCR", "n") == 2


async def test_a_close_not_yet_seen_fails_one_batch_clearly_and_is_never_resent(
    tmp_path, monkeypatch
):
    """Redis may have run a batch whose reply never came, so a failed read is not retried."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from realtime import store

    monkeypatch.setattr(store, "_stale", lambda connection: False)
    async with _pipeline_across_a_restart(tmp_path) as (pipeline, restart):
        restart()
        with pytest.raises(RedisConnectionError):
            await pipeline.execute("INCR", "n")
        assert await pipeline.execute("INCR", "n") == 1  # reconnected; sent once


async def test_a_reply_cut_off_fails_only_the_commands_not_yet_answered(client, monkeypatch):
    from redis.exceptions import TimeoutError as RedisTimeoutError

    pipeline = AutoPipeline(client)
    parse = client.parse_response
    calls = []

    async def slow_second_reply(connection, command_name, **options):
        calls.append(command_name)
        if len(calls) == 2:
            raise RedisTimeoutError("Timeout reading from socket")
        return await parse(connection, command_name, **options)

    monkeypatch.setattr(client, "parse_response", slow_second_reply)
    results = await asyncio.gather(
        *(pipeline.execute("INCR", "n") for _ in range(3)), return_exceptions=True
    )
    assert results[0] == 1
    assert all(isinstance(r, RedisTimeoutError) for r in results[1:])
    monkeypatch.setattr(client, "parse_response", parse)
    # The connection was dropped with the third reply unread; a new one answers cleanly.
    assert await pipeline.execute("GET", "n") == b"3"


async def test_a_command_redis_py_cannot_encode_fails_its_batch_and_not_the_next(client):
    from redis.exceptions import DataError

    pipeline = AutoPipeline(client)
    with pytest.raises(DataError):
        await pipeline.execute("SET", "k", object())
    assert await pipeline.execute("INCR", "n") == 1
