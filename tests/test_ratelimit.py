import pytest
import redis.asyncio as aioredis

from realtime.ratelimit import MemoryLimiter, Rate, RedisLimiter, parse_rate

from .servers import running_redis


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("20/10s", Rate(20, 10.0)),
        ("5/s", Rate(5, 1.0)),
        ("100/m", Rate(100, 60.0)),
        ("1000/1h", Rate(1000, 3600.0)),
        ("3/500ms", Rate(3, 0.5)),
        (" 7 / 2s ", Rate(7, 2.0)),
        ("4/2", Rate(4, 2.0)),
    ],
)
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "20", "x/10s", "20/10d", "0/1s", "5/0s", "-1/s", "5/s/s"])
def test_bad_rates_are_refused_with_a_reason(text):
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


class Clock:
    def __init__(self):
        self.now = 5000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("ratelimit-redis")) as server:
        yield server.url


@pytest.fixture(params=["memory", "redis"])
async def limiter(request):
    clock = Clock()
    if request.param == "memory":
        yield MemoryLimiter(clock), clock
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    await client.flushdb()
    yield RedisLimiter(client, clock), clock
    await client.aclose()


async def test_a_burst_of_count_then_one_per_interval(limiter):
    limit, clock = limiter
    rate = parse_rate("4/2s")  # burst of 4, then one per 0.5 s
    assert [await limit.hit("u1", rate) for _ in range(4)] == [None] * 4
    retry = await limit.hit("u1", rate)
    assert retry == pytest.approx(0.5)
    clock.now += 0.5
    assert await limit.hit("u1", rate) is None
    assert await limit.hit("u1", rate) == pytest.approx(0.5)
    clock.now += 2.0  # a full period later the whole burst is back
    assert [await limit.hit("u1", rate) for _ in range(4)] == [None] * 4


async def test_subjects_are_limited_separately(limiter):
    limit, _ = limiter
    rate = parse_rate("1/10s")
    assert await limit.hit("alice", rate) is None
    assert await limit.hit("alice", rate) is not None
    assert await limit.hit("bob", rate) is None


async def test_refused_hits_do_not_use_up_the_allowance(limiter):
    limit, clock = limiter
    rate = parse_rate("2/1s")
    await limit.hit("u", rate)
    await limit.hit("u", rate)
    for _ in range(50):  # hammering while limited must not push the next slot further out
        assert await limit.hit("u", rate) is not None
    clock.now += 0.5
    assert await limit.hit("u", rate) is None


async def test_redis_limit_is_shared_by_two_clients(redis_url):
    clock = Clock()
    one = aioredis.Redis.from_url(redis_url)
    two = aioredis.Redis.from_url(redis_url)
    await one.flushdb()
    rate = parse_rate("3/10s")
    results = []
    for client in (one, two, one, two):
        results.append(await RedisLimiter(client, clock).hit("shared", rate))
    assert results[:3] == [None, None, None] and results[3] is not None
    await one.aclose()
    await two.aclose()


async def test_concurrent_hits_share_one_round_trip_and_each_gets_its_own_answer(redis_url):
    import asyncio

    from realtime import store

    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    limit = RedisLimiter(client, Clock())
    pipeline = store.pipeline_for(client)
    before = pipeline.flushes
    rate = parse_rate("3/10s")
    results = await asyncio.gather(*(limit.hit(f"user{i % 2}", rate) for i in range(8)))
    # user0 and user1 each get a burst of 3; their 4th hits are refused, in order.
    assert [r is None for r in results[0::2]] == [True, True, True, False]
    assert [r is None for r in results[1::2]] == [True, True, True, False]
    assert pipeline.flushes - before == 1
    await client.aclose()


async def test_the_limit_survives_redis_forgetting_its_scripts(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    limit = RedisLimiter(client, Clock())
    rate = parse_rate("1/10s")
    assert await limit.hit("u", rate) is None
    await client.script_flush()  # as after a Redis restart
    assert await limit.hit("u", rate) is not None
    await client.aclose()
