import pytest
from django.core.checks import run_checks


def ids(**kwargs):
    return {message.id for message in run_checks(**kwargs) if message.id.startswith("realtime.")}


def test_demo_settings_pass_every_check(settings):
    settings.DEBUG = True  # pytest-django turns it off; the demo runs with it on
    assert ids() == set()


def test_e001_channels_missing(settings):
    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a != "channels"]
    assert "realtime.E001" in ids()


def test_e002_layer_missing(settings):
    settings.CHANNEL_LAYERS = {}
    assert "realtime.E002" in ids()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REALTIME_MAX_PAYLOAD_BYTES", "64k"),
        ("REALTIME_MAX_PAYLOAD_BYTES", 10),
        ("REALTIME_RECOVERY_LIMIT", -1),
        ("REALTIME_HEARTBEAT", True),
        ("REALTIME_ALLOW_ANONYMOUS_READ", "yes"),
        ("REALTIME_CHANNEL_LAYER", 3),
        ("REALTIME_GAP_FILL_BATCH", 0),
        ("REALTIME_TYPING_RATE", "fast"),
    ],
)
def test_e003_malformed_setting(settings, name, value):
    setattr(settings, name, value)
    assert "realtime.E003" in ids()


def test_w001_in_memory_layer_without_debug(settings):
    settings.DEBUG = False
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    assert "realtime.W001" in ids()


@pytest.mark.parametrize(
    "host",
    ["redis://127.0.0.1:6379/0", {"address": "redis://127.0.0.1:6379/0"}, {"socket_timeout": 5}],
)
def test_w002_redis_host_without_socket_timeout(settings, host):
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [host]}}
    }
    assert "realtime.W002" in ids()


def test_layer_helper_output_passes(settings):
    from realtime.layers import channel_layer

    settings.DEBUG = False
    settings.CHANNEL_LAYERS = {"default": channel_layer("redis://127.0.0.1:6379/0")}
    assert ids() == set()


def test_w003_sqlite_without_immediate_transactions(settings, monkeypatch):
    monkeypatch.setitem(settings.DATABASES["default"], "OPTIONS", {})
    assert "realtime.W003" in ids()


def test_w002_not_raised_for_pubsub_layer(settings):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:6379/0"]},
        }
    }
    assert "realtime.W002" not in ids()
