"""Parse libpq connection strings (URL and key=value forms) into a typed value.

Only what pgguard needs to reach its upstream: hosts (TCP or a unix-socket directory), port,
user, password, database, sslmode and the TLS file options. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_KV = re.compile(r"\s*(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s]*)")


@dataclass(frozen=True, slots=True)
class Dsn:
    host: str = "localhost"
    port: int = 5432
    user: str = "postgres"
    password: str | None = None
    dbname: str | None = None
    sslmode: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def is_unix_socket(self) -> bool:
        return self.host.startswith("/")

    @property
    def socket_path(self) -> str:
        return f"{self.host}/.s.PGSQL.{self.port}"

    def describe(self) -> str:
        """Where this points, without credentials (for logs and errors)."""
        where = self.socket_path if self.is_unix_socket else f"{self.host}:{self.port}"
        return f"{where} as {self.user}"


def parse_dsn(text: str) -> Dsn:
    """Parse a libpq URL (``postgresql://...``) or key=value string; ValueError if malformed."""
    text = text.strip()
    if not text:
        raise ValueError("empty connection string")
    if text.startswith(("postgresql://", "postgres://")):
        params = _parse_url(text)
    else:
        params = _parse_keyvalue(text)
    return _build(params)


def _parse_url(text: str) -> dict[str, str]:
    parts = urlsplit(text)
    params: dict[str, str] = {}
    try:
        hostname, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"invalid port in connection URL: {exc}") from exc
    if hostname:
        params["host"] = unquote(hostname)
    if port is not None:
        params["port"] = str(port)
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password:
        params["password"] = unquote(parts.password)
    if parts.path and parts.path != "/":
        params["dbname"] = unquote(parts.path.lstrip("/"))
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        params[key] = value
    return params


def _parse_keyvalue(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _KV.match(text, pos)
        if not match:
            if text[pos:].strip():
                raise ValueError(f"invalid connection string near {text[pos : pos + 20]!r}")
            break
        key, value = match.group(1), match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key] = value
        pos = match.end()
    return params


def _build(params: dict[str, str]) -> Dsn:
    known = {"host", "port", "user", "password", "dbname", "sslmode"}
    port_text = params.get("port", "5432")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid port {port_text!r}")
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        raise ValueError(f"invalid sslmode {sslmode!r}; expected one of {', '.join(SSLMODES)}")
    host = params.get("host") or "localhost"
    if "," in host:
        raise ValueError("multiple hosts are not supported in the upstream DSN")
    return Dsn(
        host=host,
        port=int(port_text),
        user=params.get("user") or "postgres",
        password=params.get("password"),
        dbname=params.get("dbname") or None,
        sslmode=sslmode,
        options={k: v for k, v in params.items() if k not in known},
    )
