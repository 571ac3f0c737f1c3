"""Render the deployment files in deploy/ for given ports and paths.

Production (writes the nginx site for the http context):

    python deploy/render.py nginx --upstream 127.0.0.1:8001 --upstream 127.0.0.1:8002 \\
        --server-name chat.example.com --static-root /srv/realtime/staticfiles \\
        --tls-cert /etc/letsencrypt/live/chat.example.com/fullchain.pem \\
        --tls-key /etc/letsencrypt/live/chat.example.com/privkey.pem \\
        > /etc/nginx/conf.d/realtime.conf

``make serve`` (deploy/serve.py) and the fault tests (tests/servers.py) render the same
templates with loopback ports, and start daphne with the command line of the systemd unit, so
the files shipped here are the ones that are tested. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
SITE_TEMPLATE = DEPLOY_DIR / "nginx" / "realtime.conf.template"
LOCAL_TEMPLATE = DEPLOY_DIR / "nginx" / "nginx-local.conf.template"
DAPHNE_UNIT = DEPLOY_DIR / "systemd" / "realtime-daphne@.service"
MIME_TYPES = "/etc/nginx/mime.types"

_FIELD = re.compile(r"\{\{(\w+)\}\}")


class RenderError(ValueError):
    """A template and its values do not fit together."""


def render(template: str, values: Mapping[str, str]) -> str:
    """Replace every ``{{name}}``; every field needs a value and every value a field."""
    fields = set(_FIELD.findall(template))
    missing, unused = fields - set(values), set(values) - fields
    if missing or unused:
        raise RenderError(f"template fields missing: {sorted(missing)}; unused: {sorted(unused)}")
    return _FIELD.sub(lambda match: values[match.group(1)], template)


def nginx_site(
    upstreams: Sequence[str],
    static_root: str,
    listen: str = "80",
    server_name: str = "_",
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> str:
    """The nginx site (http context): ``upstreams`` are daphne ``host:port`` addresses."""
    if not upstreams:
        raise RenderError("at least one upstream (daphne host:port) is needed")
    if (tls_cert is None) != (tls_key is None):
        raise RenderError("give both --tls-cert and --tls-key, or neither")
    servers = "\n".join(f"    server {a} max_fails=1 fail_timeout=5s;" for a in upstreams)
    tls = redirect = ""
    if tls_cert is not None:
        if listen == "80":
            listen = "443 ssl"
        tls = (
            f"    ssl_certificate {tls_cert};\n"
            f"    ssl_certificate_key {tls_key};\n"
            "    ssl_protocols TLSv1.2 TLSv1.3;\n"
            "    ssl_session_cache shared:realtime_tls:10m;\n"
        )
        redirect = (
            "server {\n"
            "    listen 80;\n"
            f"    server_name {server_name};\n"
            "    return 301 https://$host$request_uri;\n"
            "}\n"
        )
    return render(
        SITE_TEMPLATE.read_text(),
        {
            "upstream_servers": servers,
            "listen": listen,
            "server_name": server_name,
            "static_root": static_root.rstrip("/"),
            "tls": tls,
            "redirect_server": redirect,
        },
    )


def nginx_local(prefix: Path, site: Path, mime_types: str = MIME_TYPES) -> str:
    """A complete nginx.conf running ``site`` from the private directory ``prefix``."""
    # As root, nginx would run its workers as "nobody", who cannot read a private prefix.
    user = "user root;" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    return render(
        LOCAL_TEMPLATE.read_text(),
        {"prefix": str(prefix), "site": str(site), "mime_types": mime_types, "user": user},
    )


def write_local_nginx(
    prefix: Path, upstreams: Sequence[str], listen: str, static_root: str
) -> Path:
    """Write site + nginx.conf (and temp dirs) under ``prefix``; returns the nginx.conf path."""
    for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    site = prefix / "realtime.conf"
    site.write_text(nginx_site(upstreams, static_root, listen=listen, server_name="_"))
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_local(prefix, site))
    return conf


def daphne_argv(port: int, daphne: str = "daphne") -> list[str]:
    """The systemd unit's ExecStart for instance ``port``, with ``daphne`` as the program."""
    for line in DAPHNE_UNIT.read_text().splitlines():
        if line.startswith("ExecStart="):
            argv = shlex.split(line.removeprefix("ExecStart="))
            return [daphne, *(arg.replace("%i", str(port)) for arg in argv[1:])]
    raise RenderError(f"{DAPHNE_UNIT} has no ExecStart line")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    nginx = commands.add_parser("nginx", help="print the nginx site for the http context")
    nginx.add_argument(
        "--upstream", action="append", required=True, help="daphne host:port (repeat)"
    )
    nginx.add_argument("--static-root", required=True, help="STATIC_ROOT (collectstatic)")
    nginx.add_argument("--server-name", default="_")
    nginx.add_argument("--listen", default="80", help='default "80", or "443 ssl" with TLS')
    nginx.add_argument("--tls-cert", help="certificate chain (PEM): terminate TLS in nginx")
    nginx.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    args = parser.parse_args(argv)
    try:
        text = nginx_site(
            args.upstream,
            args.static_root,
            listen=args.listen,
            server_name=args.server_name,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except RenderError as exc:
        parser.error(str(exc))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
