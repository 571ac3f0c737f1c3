import pytest
from django.core.management import call_command

from realtime.models import Membership, Room

pytestmark = pytest.mark.django_db


def test_rooms_api_lists_only_readable_rooms(client, users, rooms):
    client.force_login(users["carol"])
    body = client.get("/realtime/api/rooms/").json()
    assert [r["room"] for r in body["rooms"]] == ["lobby", "news"]
    client.force_login(users["alice"])
    slugs = [r["room"] for r in client.get("/realtime/api/rooms/").json()["rooms"]]
    assert slugs == ["lobby", "news", "team"]


def test_rooms_api_refuses_post(client, users):
    client.force_login(users["alice"])
    assert client.post("/realtime/api/rooms/").status_code == 405


def test_room_page_renders_client_script(client, users, rooms):
    client.force_login(users["alice"])
    page = client.get("/rooms/lobby/").content.decode()
    assert "realtime/realtime.js" in page


def test_seed_demo_is_idempotent(django_user_model):
    call_command("seed_demo")
    call_command("seed_demo")
    names = set(django_user_model.objects.values_list("username", flat=True))
    assert names == {"alice", "bob", "carol", "admin"}
    assert django_user_model.objects.get(username="admin").is_superuser
    assert django_user_model.objects.get(username="bob").check_password("realtime-demo")
    kinds = dict(Room.objects.values_list("slug", "kind"))
    assert kinds == {"lobby": "public", "team": "private", "announcements": "announce"}
    team = set(
        Membership.objects.filter(room__slug="team").values_list("user__username", flat=True)
    )
    assert team == {"alice", "bob"}


def test_admin_lists_rooms_members_and_messages(client, users, rooms):
    client.force_login(users["root"])
    for path in ("room", "membership", "message"):
        response = client.get(f"/admin/realtime/{path}/")
        assert response.status_code == 200, path
    assert b"lobby" in client.get("/admin/realtime/room/").content
