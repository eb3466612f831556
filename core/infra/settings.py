"""All configuration, read once from the environment into one frozen object.

Every field names its environment variable and help text; ``python -m
gateway --help`` prints this table. Nothing else in the package reads
``os.environ``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from core.infra.rate import Rate

__all__ = ["MIN_JWT_SECRET_BYTES", "Settings", "SettingsError"]

#: The shortest ``JWT_SECRET``: an HS256 key has at least 256 bits (RFC 7518 section 3.2);
#: a shorter one can be found offline from any one token, and then any token forged.
MIN_JWT_SECRET_BYTES = 32


class SettingsError(ValueError):
    """An environment variable holds a value the gateway cannot use."""


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _rate(raw: str) -> Rate | None:
    return Rate.parse(raw)


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _gc_thresholds(raw: str) -> tuple[int, int, int]:
    parts = [int(part) for part in raw.split(",")]
    if len(parts) != 3 or parts[0] <= 0 or min(parts) < 0:
        raise ValueError(f"expected three thresholds like 700,10,10, got {raw!r}")
    return parts[0], parts[1], parts[2]


def _optional(raw: str) -> str | None:
    return raw or None


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {raw!r}")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _zlib_level(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 9:
        raise ValueError(f"expected a zlib level from 1 to 9, got {raw!r}")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port number, got {raw!r}")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {raw!r}")
    return value


def _finite(raw: str) -> float:
    """A number of seconds: ``nan`` and ``inf`` (``1e999`` too) are no such thing.

    A ``JWT_LEEWAY`` of ``nan`` or ``inf`` made every expired token valid, a
    ``HEADER_TIMEOUT`` of ``inf`` turned the header deadline off.
    """
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return value


def _positive_float(raw: str) -> float:
    value = _finite(raw)
    if not value > 0:
        raise ValueError(f"expected a number > 0, got {raw!r}")
    return value


def _identifier(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", raw):
        raise ValueError(f"expected an SQL identifier, got {raw!r}")
    return raw


def _non_negative_float(raw: str) -> float:
    value = _finite(raw)
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {raw!r}")
    return value


def _cidrs(raw: str) -> tuple[str, ...]:
    networks = _list(raw)
    for net in networks:
        ipaddress.ip_network(net, strict=False)  # ValueError names the bad one
    return networks


def _url(raw: str) -> str | None:
    if not raw:
        return None
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {raw!r}")
    return raw


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in logging.getLevelNamesMapping() or value == "NOTSET":
        raise ValueError(f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {raw!r}")
    return value


def _scheme_url(*schemes: str) -> Callable[[str], str | None]:
    """A URL of one of ``schemes`` (empty: unset), said at start rather than by a traceback."""

    def parse(raw: str) -> str | None:
        if not raw:
            return None
        scheme = urllib.parse.urlsplit(raw).scheme.lower()
        if scheme not in schemes:
            allowed = " or ".join(f"{s}://" for s in schemes)
            raise ValueError(f"expected a {allowed} URL, got one starting {raw.split(':')[0]!r}")
        return raw

    return parse


def _header_names(raw: str) -> tuple[str, ...]:
    names = _list(raw)
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
            raise ValueError(f"expected header names, got {name!r}")
    return names


def _setting(default: Any, env: str, help: str, parse: Callable[[str], Any]) -> Any:
    return dataclasses.field(default=default, metadata={"env": env, "help": help, "parse": parse})


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    host: str = _setting("127.0.0.1", "HOST", "Interface to listen on.", str)
    port: int = _setting(8888, "PORT", "TCP port to listen on (0: any free port).", _port)
    workers: int = _setting(
        0,
        "WORKERS",
        "Gateway processes sharing the port (0: one per core; one without REDIS_URL). "
        "--workers N overrides it.",
        _non_negative_int,
    )
    redis_url: str | None = _setting(
        None,
        "REDIS_URL",
        "Redis for cross-process fan-out; unset: in-memory broker.",
        _scheme_url("redis", "rediss", "unix"),
    )
    redis_prefix: str = _setting(
        "gw:", "REDIS_PREFIX", "Prefix of Redis channel names (gw:room:1 for room:1).", str
    )
    redis_cluster: bool = _setting(
        False,
        "REDIS_CLUSTER",
        "REDIS_URL names a node of a Redis Cluster (Redis >= 7): sharded pub/sub, channel "
        "room:1 is SPUBLISH gw:{room:1}. See docs/redis-cluster.md.",
        _bool,
    )
    redis_pool_size: int = _setting(
        64,
        "REDIS_POOL_SIZE",
        "Redis connections for commands (history, presence, publishing, rate limits) per process; "
        "a burst beyond it waits for one (REDIS_POOL_TIMEOUT) instead of failing.",
        _positive_int,
    )
    redis_pool_timeout: float = _setting(
        15.0,
        "REDIS_POOL_TIMEOUT",
        "Seconds a command waits for a pooled Redis connection before it fails (temporary error); "
        "long, because in a reconnect storm the wait is the event loop's, and a failure makes "
        "the client ask again.",
        _positive_float,
    )
    redis_health_interval: float = _setting(
        3.0,
        "REDIS_HEALTH_INTERVAL",
        "Seconds of quiet after which the pub/sub link is pinged (0: never).",
        _non_negative_float,
    )
    redis_health_timeout: float = _setting(
        2.0,
        "REDIS_HEALTH_TIMEOUT",
        "Seconds for a pinged pub/sub link to answer before it counts as lost (gap, reconnect).",
        _positive_float,
    )
    database_url: str | None = _setting(
        None,
        "DATABASE_URL",
        "PostgreSQL for the REST core; unset: embedded PostgreSQL under DATA_DIR (make run).",
        _scheme_url("postgresql", "postgres"),
    )
    database_schema: str = _setting(
        "public",
        "DATABASE_SCHEMA",
        "Schema of the core's tables (created if missing).",
        _identifier,
    )
    migrate_on_start: bool = _setting(
        False,
        "MIGRATE_ON_START",
        "Apply pending migrations at start-up (every process, every Lambda cold start). Off: "
        "`python -m core migrate` is a deploy step, and start-up only checks that every "
        "migration is applied and unedited, refusing to start if not (the embedded PostgreSQL "
        "of make run is always migrated).",
        _bool,
    )
    db_pool_min: int = _setting(
        2, "DB_POOL_MIN", "Connections the pool keeps open.", _non_negative_int
    )
    db_pool_max: int = _setting(
        10, "DB_POOL_MAX", "Most connections the pool opens.", _positive_int
    )
    db_connect_timeout: float = _setting(
        10.0, "DB_CONNECT_TIMEOUT", "Seconds to connect or acquire a connection.", _positive_float
    )
    db_command_timeout: float = _setting(
        10.0, "DB_COMMAND_TIMEOUT", "Seconds a query may run.", _positive_float
    )
    db_probe_timeout: float = _setting(
        2.0,
        "DB_PROBE_TIMEOUT",
        "Seconds each probe of a PostgreSQL found unreachable may take (connect and select 1); "
        "REST calls that need it are refused at once until a probe succeeds.",
        _positive_float,
    )
    db_statement_cache_size: int = _setting(
        100,
        "DB_STATEMENT_CACHE",
        "Prepared statements cached per connection (0: off).",
        _non_negative_int,
    )
    core_url: str | None = _setting(
        None,
        "CORE_URL",
        "The REST core as a separate service (http://core:8081): the gateway then holds no "
        "database pool or credentials and forwards /api/* and socket rpc frames to it. "
        "Unset: the core runs inside the gateway on DATABASE_URL.",
        _url,
    )
    core_pool_size: int = _setting(
        64,
        "CORE_POOL_SIZE",
        "Keep-alive connections to CORE_URL per process (requests beyond wait for one).",
        _positive_int,
    )
    core_connection_max_age: float = _setting(
        60.0,
        "CORE_CONNECTION_MAX_AGE",
        "Seconds a gateway uses one pool of connections to CORE_URL before a fresh pool takes "
        "new requests (the old one closes once its requests are answered), so core pods added "
        "under steady load get their share.",
        _positive_float,
    )
    core_timeout: float = _setting(
        10.0,
        "CORE_TIMEOUT",
        "Seconds a forwarded request may take, connecting included (then 504).",
        _positive_float,
    )
    core_retries: int = _setting(
        1,
        "CORE_RETRIES",
        "Retries of a forwarded request that failed to connect or got 502/503 from the core: "
        "only for GET, HEAD, PUT, DELETE, OPTIONS, and POST/PATCH with an Idempotency-Key.",
        _non_negative_int,
    )
    core_breaker_failures: int = _setting(
        5,
        "CORE_BREAKER_FAILURES",
        "Failures in a row (no answer, or 502/503/504) after which the gateway stops forwarding "
        "and answers 503 at once.",
        _positive_int,
    )
    core_breaker_seconds: float = _setting(
        5.0,
        "CORE_BREAKER_SECONDS",
        "Seconds the breaker stays open before one request probes the core again.",
        _positive_float,
    )
    events_stream: bool = _setting(
        False,
        "EVENTS_STREAM",
        "Append every connect, disconnect, subscribe and unsubscribe to the Redis Stream "
        "<REDIS_PREFIX>events, for backends reading it with consumer groups; a node that dies "
        "has its connections' disconnects appended by another once PRESENCE_TTL has passed. "
        "See docs/events.md.",
        _bool,
    )
    events_maxlen: int = _setting(
        1_000_000,
        "EVENTS_MAXLEN",
        "Events the stream keeps (XADD MAXLEN ~, so a little more); older ones are trimmed.",
        _positive_int,
    )
    events_buffer: int = _setting(
        100_000,
        "EVENTS_BUFFER",
        "Events one process holds while Redis cannot take them; more are dropped and counted.",
        _positive_int,
    )
    events_webhook_url: str | None = _setting(
        None,
        "EVENTS_WEBHOOK_URL",
        "Also POST the events, in signed batches, to this URL (needs EVENTS_STREAM and "
        "HOOK_SECRET).",
        _optional,
    )
    events_webhook_batch: int = _setting(
        100, "EVENTS_WEBHOOK_BATCH", "Most events in one webhook POST.", _positive_int
    )
    events_webhook_queue: int = _setting(
        10_000,
        "EVENTS_WEBHOOK_QUEUE",
        "Events waiting for the webhook per process; more are dropped and counted.",
        _positive_int,
    )
    events_webhook_retries: int = _setting(
        5,
        "EVENTS_WEBHOOK_RETRIES",
        "Retries of a webhook batch that failed (no answer, or not 2xx), with backoff; then "
        "the batch is dropped and counted.",
        _non_negative_int,
    )
    events_webhook_timeout: float = _setting(
        5.0,
        "EVENTS_WEBHOOK_TIMEOUT",
        "Seconds a webhook POST may take, connecting included.",
        _positive_float,
    )
    hook_connect_url: str | None = _setting(
        None,
        "HOOK_CONNECT_URL",
        "Backend asked before every new connection (socket, SSE, long-poll) is admitted; it "
        "may admit clients without a token (docs/hooks.md). Unset: no connect hook.",
        _url,
    )
    hook_subscribe_url: str | None = _setting(
        None,
        "HOOK_SUBSCRIBE_URL",
        "Backend asked before a subscription to a channel of HOOK_SUBSCRIBE_CHANNELS is made.",
        _url,
    )
    hook_subscribe_channels: tuple[str, ...] = _setting(
        ("*",),
        "HOOK_SUBSCRIBE_CHANNELS",
        "Channel patterns whose subscriptions go through HOOK_SUBSCRIBE_URL.",
        _list,
    )
    hook_publish_url: str | None = _setting(
        None,
        "HOOK_PUBLISH_URL",
        "Backend asked before a client's pub on a channel of HOOK_PUBLISH_CHANNELS is published; "
        "it may refuse it or replace its data.",
        _url,
    )
    hook_publish_channels: tuple[str, ...] = _setting(
        ("*",),
        "HOOK_PUBLISH_CHANNELS",
        "Channel patterns whose client publications go through HOOK_PUBLISH_URL.",
        _list,
    )
    hook_call_url: str | None = _setting(
        None,
        "HOOK_CALL_URL",
        "Backend that answers the call op (unset: calls fail with 110).",
        _url,
    )
    hook_refresh_url: str | None = _setting(
        None,
        "HOOK_REFRESH_URL",
        "Backend asked TOKEN_NOTICE seconds before a connection's identity expires, for a new "
        "expire_at (or a disconnect).",
        _url,
    )
    hook_secret: str | None = _setting(
        None,
        "HOOK_SECRET",
        "HMAC-SHA256 key signing every hook request and events webhook POST "
        "(X-Gateway-Signature); at least 32 characters; required when a HOOK_*_URL or "
        "EVENTS_WEBHOOK_URL is set.",
        _optional,
    )
    hook_forward_headers: tuple[str, ...] = _setting(
        ("Cookie", "Authorization", "Origin", "User-Agent"),
        "HOOK_FORWARD_HEADERS",
        "Request headers of a new connection passed to the connect hook (in its JSON body).",
        _header_names,
    )
    hook_timeout: float = _setting(
        1.0,
        "HOOK_TIMEOUT",
        "Seconds a hook call may take, waiting for a free slot included; then its failure policy "
        "applies.",
        _positive_float,
    )
    hook_concurrency: int = _setting(
        64,
        "HOOK_CONCURRENCY",
        "Hook calls in flight per process (keep-alive connections to the backends).",
        _positive_int,
    )
    hook_queue: int = _setting(
        256,
        "HOOK_QUEUE",
        "Hook calls per process that may wait for one of HOOK_CONCURRENCY slots (within "
        "HOOK_TIMEOUT); more fail at once (overloaded: their failure policy applies).",
        _non_negative_int,
    )
    hook_breaker_failures: int = _setting(
        5,
        "HOOK_BREAKER_FAILURES",
        "Failures in a row (no answer in time, unreachable, not 200, a bad answer) after which a "
        "hook is not called for HOOK_BREAKER_SECONDS (its failure policy applies at once).",
        _positive_int,
    )
    hook_breaker_seconds: float = _setting(
        5.0,
        "HOOK_BREAKER_SECONDS",
        "Seconds a hook's breaker stays open before one call probes its backend again.",
        _positive_float,
    )
    hook_subscribe_fail_open: bool = _setting(
        False,
        "HOOK_SUBSCRIBE_FAIL_OPEN",
        "When the subscribe hook fails (no answer, breaker open), subscribe anyway "
        "(default: refuse with 110).",
        _bool,
    )
    hook_publish_fail_open: bool = _setting(
        False,
        "HOOK_PUBLISH_FAIL_OPEN",
        "When the publish hook fails, publish the client's data unchanged (default: refuse with "
        "110).",
        _bool,
    )
    max_body_bytes: int = _setting(
        1048576, "MAX_BODY_BYTES", "Largest REST request body (larger: 413).", _positive_int
    )
    max_projects_per_user: int = _setting(
        1000,
        "MAX_PROJECTS_PER_USER",
        "Projects a user may own; creating another is 409 limit_reached (admins and API keys "
        "create without a limit; 0: no limit).",
        _non_negative_int,
    )
    idempotency_ttl: float = _setting(
        86400.0,
        "IDEMPOTENCY_TTL",
        "Seconds an Idempotency-Key's response is kept.",
        _positive_float,
    )
    jwt_secret: str | None = _setting(
        None,
        "JWT_SECRET",
        f"HMAC secret for HS256/384/512 tokens ({MIN_JWT_SECRET_BYTES} bytes or more).",
        _optional,
    )
    jwt_public_key: str | None = _setting(
        None,
        "JWT_PUBLIC_KEY",
        "PEM public key (text or file path) for RS*/ES*/PS* tokens.",
        _optional,
    )
    jwt_jwks_file: str | None = _setting(
        None, "JWT_JWKS_FILE", "JWKS file with public keys, chosen by the token's kid.", _optional
    )
    jwt_signing_keys: str | None = _setting(
        None,
        "JWT_SIGNING_KEYS",
        "JWKS file of private keys for issued tokens (first signs; all are published).",
        _optional,
    )
    jwt_issued_keys: str | None = _setting(
        None,
        "JWT_ISSUED_KEYS",
        "JWKS file of the public halves of JWT_SIGNING_KEYS (python -m gateway keygen "
        "--public-of FILE): a gateway with CORE_URL verifies the tokens the core issues as "
        "its own with these, holding no private key.",
        _optional,
    )
    jwt_algorithms: tuple[str, ...] = _setting(
        (), "JWT_ALGORITHMS", "Accepted algorithms (default: those the keys allow).", _list
    )
    jwt_issuer: str | None = _setting(None, "JWT_ISSUER", "Required iss claim.", _optional)
    jwt_audience: str | None = _setting(None, "JWT_AUDIENCE", "Required aud claim.", _optional)
    jwt_leeway: float = _setting(
        0.0, "JWT_LEEWAY", "Seconds of clock skew allowed on exp/nbf.", _non_negative_float
    )
    max_token_bytes: int = _setting(
        8192, "MAX_TOKEN_BYTES", "Longest token accepted (bytes).", _positive_int
    )
    access_token_ttl: float = _setting(
        900.0, "ACCESS_TOKEN_TTL", "Seconds an issued access token lives.", _positive_float
    )
    token_notice: float = _setting(
        60.0,
        "TOKEN_NOTICE",
        "Seconds before a socket's token expires that it is sent an `expiring` push.",
        _non_negative_float,
    )
    token_grace: float = _setting(
        5.0,
        "TOKEN_GRACE",
        "Seconds a socket may stay open past its token's exp (to refresh) before 4002.",
        _non_negative_float,
    )
    session_ttl: float = _setting(
        30 * 86400.0,
        "SESSION_TTL",
        "Seconds a login session (its refresh tokens) lives at most.",
        _positive_float,
    )
    registration_open: bool = _setting(
        True, "REGISTRATION_OPEN", "Whether POST /api/auth/register creates accounts.", _bool
    )
    user_channels: tuple[str, ...] = _setting(
        ("user:{sub}", "projects", "projects:*"),
        "USER_CHANNELS",
        "Channel patterns in issued user tokens ({sub} is the user id).",
        _list,
    )
    admin_channels: tuple[str, ...] = _setting(
        ("*",), "ADMIN_CHANNELS", "Channel patterns in issued admin tokens.", _list
    )
    user_publish: tuple[str, ...] = _setting(
        ("user:{sub}",),
        "USER_PUBLISH",
        "Channel patterns issued user tokens may publish on (claim pub; empty: none).",
        _list,
    )
    admin_publish: tuple[str, ...] = _setting(
        ("user:{sub}",),
        "ADMIN_PUBLISH",
        "Channel patterns issued admin tokens may publish on (claim pub; empty: none).",
        _list,
    )
    core_channels: tuple[str, ...] = _setting(
        ("projects", "projects:*"),
        "CORE_CHANNELS",
        "Channel patterns only the REST core publishes on: refused to every client publish.",
        _list,
    )
    rate_login_ip: Rate | None = _setting(
        Rate(20, 60.0),
        "RATE_LOGIN_IP",
        "Failed logins (any account; a refresh with a token nobody issued is one), and "
        "registrations, per client IP (n/seconds).",
        _rate,
    )
    rate_login_account: Rate | None = _setting(
        Rate(5, 60.0),
        "RATE_LOGIN_ACCOUNT",
        "Failed logins per account per client IP (n/seconds); a success resets it.",
        _rate,
    )
    metrics_token: str | None = _setting(
        None,
        "METRICS_TOKEN",
        "Bearer token /metrics requires (unset: /metrics is open, with a warning at start).",
        _optional,
    )
    rate_rest: Rate | None = _setting(
        Rate(1200, 60.0), "RATE_REST", "REST requests per identity (n/seconds; off: none).", _rate
    )
    rate_connect_ip: Rate | None = _setting(
        Rate(300, 10.0), "RATE_CONNECT_IP", "New socket connections per client IP.", _rate
    )
    rate_socket_commands: Rate | None = _setting(
        Rate(100, 1.0), "RATE_SOCKET_COMMANDS", "Commands per socket connection.", _rate
    )
    rate_socket_publish: Rate | None = _setting(
        Rate(20, 1.0), "RATE_SOCKET_PUBLISH", "Publications (pub) per socket connection.", _rate
    )
    password_time_cost: int = _setting(
        3, "PASSWORD_TIME_COST", "argon2id passes (RFC 9106 default 3).", _positive_int
    )
    password_memory_kib: int = _setting(
        65536, "PASSWORD_MEMORY_KIB", "argon2id memory in KiB (default 64 MiB).", _positive_int
    )
    history_channels: tuple[str, ...] = _setting(
        ("projects", "projects:*"),
        "HISTORY_CHANNELS",
        "Channel patterns whose publications are kept, with offsets, for recovery.",
        _list,
    )
    history_size: int = _setting(
        100, "HISTORY_SIZE", "Publications kept per history channel.", _positive_int
    )
    history_ttl: float = _setting(
        300.0,
        "HISTORY_TTL",
        "Seconds a channel's history lives after its last publication.",
        _positive_float,
    )
    presence_channels: tuple[str, ...] = _setting(
        (),
        "PRESENCE_CHANNELS",
        "Channel patterns that keep presence (who is subscribed); default none.",
        _list,
    )
    presence_ttl: float = _setting(
        60.0,
        "PRESENCE_TTL",
        "Seconds a presence entry lives unless refreshed (a dead node's entries vanish).",
        _positive_float,
    )
    presence_pushes: bool = _setting(
        True,
        "PRESENCE_PUSHES",
        "Push join and leave events to subscribers of presence channels.",
        _bool,
    )
    max_connections: int = _setting(
        0,
        "MAX_CONNECTIONS",
        "Sockets and SSE streams one process holds before refusing more with 503 "
        "(0: the open-file limit less 256 kept for everything else).",
        _non_negative_int,
    )
    max_connections_per_user: int = _setting(
        1000,
        "MAX_CONNECTIONS_PER_USER",
        "Sockets, SSE streams and long-poll sessions one user (or API key) holds in one "
        "process before refusing more with 429 (0: no limit).",
        _non_negative_int,
    )
    header_timeout: float = _setting(
        10.0,
        "HEADER_TIMEOUT",
        "Seconds a connection has to send a request line and headers (also the idle "
        "keep-alive wait); slower: closed.",
        _positive_float,
    )
    body_timeout: float = _setting(
        60.0,
        "BODY_TIMEOUT",
        "Seconds a request has to send its whole body once its headers are in; slower: closed.",
        _positive_float,
    )
    write_timeout: float = _setting(
        30.0,
        "WRITE_TIMEOUT",
        "Seconds an HTTP answer's client has to take 64 KiB of it (or all that is left) "
        "once the process holds bytes it cannot send; slower: the connection is reset.",
        _positive_float,
    )
    answer_buffer_total_bytes: int = _setting(
        64 << 20,
        "ANSWER_BUFFER_TOTAL_BYTES",
        "Bytes of HTTP answers all connections of a process may hold unsent together (their "
        "clients read slowly or not at all); past it, the connections holding the most are "
        "reset first.",
        _positive_int,
    )
    max_header_bytes: int = _setting(
        65536,
        "MAX_HEADER_BYTES",
        "Largest request line plus headers, in bytes as sent; larger: 414 or 431, then closed.",
        _positive_int,
    )
    max_pending_per_ip: int = _setting(
        256,
        "MAX_PENDING_PER_IP",
        "Connections one client IP may hold that have not finished their headers; more: 429 "
        "(peers in TRUSTED_PROXIES are exempt).",
        _positive_int,
    )
    longpoll_max_per_user: int = _setting(
        8,
        "LONGPOLL_MAX_PER_USER",
        "Open long-poll sessions per user (token sub; an outside IdP's sub is its own); more: 429.",
        _positive_int,
    )
    max_longpoll_sessions: int = _setting(
        2000,
        "MAX_LONGPOLL_SESSIONS",
        "Long-poll sessions one process holds (apart from MAX_CONNECTIONS); more: 503.",
        _positive_int,
    )
    longpoll_outbox_bytes: int = _setting(
        131072,
        "LONGPOLL_OUTBOX_BYTES",
        "Unacknowledged bytes a long-poll session may hold; more: closed as a slow consumer (4001).",
        _positive_int,
    )
    trusted_proxies: tuple[str, ...] = _setting(
        (),
        "TRUSTED_PROXIES",
        "CIDRs of load balancers whose forwarding header names the client IP (default none).",
        _cidrs,
    )
    proxy_protocol: bool = _setting(
        False,
        "PROXY_PROTOCOL",
        "Read a PROXY protocol v1/v2 header (an NLB's) at the start of connections; its client "
        "address is used when the peer is in TRUSTED_PROXIES.",
        _bool,
    )
    forwarded_header: str = _setting(
        "x-forwarded-for",
        "FORWARDED_HEADER",
        "The header trusted proxies set: x-forwarded-for or forwarded (RFC 7239).",
        _choice("x-forwarded-for", "forwarded"),
    )
    max_frame_bytes: int = _setting(
        65536,
        "MAX_FRAME_BYTES",
        "Largest client frame; larger closes with 1009.",
        _positive_int,
    )
    compression: bool = _setting(
        False,
        "COMPRESSION",
        "permessage-deflate (RFC 7692) for sockets whose client offers it (browsers do): off or "
        "on. Each publication is compressed once per codec for every compressing subscriber.",
        _bool,
    )
    compression_min_bytes: int = _setting(
        256,
        "COMPRESSION_MIN_BYTES",
        "With COMPRESSION: messages shorter than this (bytes) are sent uncompressed.",
        _non_negative_int,
    )
    compression_level: int = _setting(
        6,
        "COMPRESSION_LEVEL",
        "With COMPRESSION: the zlib level, 1 (fastest) to 9 (smallest).",
        _zlib_level,
    )
    compression_inflate_rate: int = _setting(
        262144,
        "COMPRESSION_INFLATE_RATE",
        "With COMPRESSION: bytes a second one socket may have the gateway inflate (4 times "
        "MAX_FRAME_BYTES at once); past it, close 1008. 0: no limit.",
        _non_negative_int,
    )
    max_publish_bytes: int = _setting(
        65536, "MAX_PUBLISH_BYTES", "Largest data a client may publish (bytes).", _positive_int
    )
    max_publication_bytes: int = _setting(
        1 << 20,
        "MAX_PUBLICATION_BYTES",
        "Largest publication from any source, backends' plain PUBLISH included (bytes of JSON); "
        "larger ones read from Redis are dropped and counted.",
        _positive_int,
    )
    max_subscriptions: int = _setting(
        128, "MAX_SUBSCRIPTIONS", "Subscriptions per connection.", _positive_int
    )
    send_buffer_bytes: int = _setting(
        1048576,
        "SEND_BUFFER_BYTES",
        "Unsent bytes a connection may queue before it is closed as a slow consumer (4001).",
        _positive_int,
    )
    send_buffer_total_bytes: int = _setting(
        256 << 20,
        "SEND_BUFFER_TOTAL_BYTES",
        "Unsent bytes all sockets of a process may queue together; past it, the sockets holding "
        "the most are ended first: open ones closed as slow consumers (4001), ones already "
        "closing dropped.",
        _positive_int,
    )
    allowed_origins: tuple[str, ...] = _setting(
        ("*",),
        "ALLOWED_ORIGINS",
        "Origins allowed to open sockets (comma list, * for any). A connection without a "
        "token (admitted by its cookies through the connect hook) only from one listed here "
        "or the gateway's own origin (its Host): * does not count for it.",
        _list,
    )
    cors_origins: tuple[str, ...] = _setting(
        (),
        "CORS_ORIGINS",
        "Browser origins allowed to call the REST API (comma list, * for any; default none).",
        _list,
    )
    data_dir: str = _setting(".data", "DATA_DIR", "Folder for embedded-mode state.", str)
    log_level: str = _setting("INFO", "LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.", _log_level)
    log_format: str = _setting(
        "auto",
        "LOG_FORMAT",
        "json (one object per line), text, or auto: text on a terminal, JSON otherwise.",
        _choice("auto", "json", "text"),
    )
    ping_interval: float = _setting(
        25.0,
        "PING_INTERVAL",
        "Seconds between server pings of a socket (0: none).",
        _non_negative_float,
    )
    pong_timeout: float = _setting(
        10.0,
        "PONG_TIMEOUT",
        "A socket silent (no frame, no pong) for PING_INTERVAL + this is dropped.",
        _non_negative_float,
    )
    longpoll_timeout: float = _setting(
        25.0,
        "LONGPOLL_TIMEOUT",
        "Seconds a long-poll waits for a message (then answered empty, within a quarter of it, "
        "at most 1 s, more).",
        _positive_float,
    )
    gc_threshold: tuple[int, int, int] = _setting(
        (700, 10, 10),
        "GC_THRESHOLD",
        "The cyclic garbage collector's thresholds (gen0,gen1,gen2; Python's default 700,10,10). "
        "Many long-poll sessions: 10000,10,100 (docs/performance.md).",
        _gc_thresholds,
    )
    longpoll_idle: float = _setting(
        60.0,
        "LONGPOLL_IDLE",
        "Seconds without a poll after which a long-poll session is closed.",
        _positive_float,
    )
    drain_seconds: float = _setting(
        5.0,
        "DRAIN_SECONDS",
        "On SIGTERM, sockets are closed (4000) evenly over this many seconds.",
        _non_negative_float,
    )
    shutdown_timeout: float = _setting(
        10.0, "SHUTDOWN_TIMEOUT", "Seconds allowed for a graceful stop.", _non_negative_float
    )

    def __post_init__(self) -> None:
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise SettingsError(
                f"JWT_SECRET: {len(self.jwt_secret.encode())} bytes is too short for an HMAC key: "
                f"use {MIN_JWT_SECRET_BYTES} bytes or more (RFC 7518 section 3.2), e.g. "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        if self.db_pool_min > self.db_pool_max:
            raise SettingsError(
                f"DB_POOL_MIN: {self.db_pool_min} is more than DB_POOL_MAX ({self.db_pool_max})"
            )
        if self.events_webhook_url and not self.events_stream:
            raise SettingsError("EVENTS_WEBHOOK_URL: needs EVENTS_STREAM=true")
        if self.events_webhook_url and len(self.hook_secret or "") < 32:
            raise SettingsError(
                "EVENTS_WEBHOOK_URL: needs HOOK_SECRET (32 characters or more) to sign its requests"
            )
        if self.hook_urls() and (self.hook_secret is None or len(self.hook_secret) < 32):
            raise SettingsError(
                "HOOK_SECRET: hook requests are signed: set it (32 characters or more) "
                "with any HOOK_*_URL"
            )

    def hook_urls(self) -> dict[str, str]:
        """The configured hooks' URLs, by hook name (``connect``, ``subscribe``, …)."""
        urls = {
            "connect": self.hook_connect_url,
            "subscribe": self.hook_subscribe_url,
            "publish": self.hook_publish_url,
            "call": self.hook_call_url,
            "refresh": self.hook_refresh_url,
        }
        return {name: url for name, url in urls.items() if url}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None:
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                raise SettingsError(f"{f.metadata['env']}: {exc}") from None
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe(cls) -> str:
        """The table printed by ``python -m gateway --help``."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default
            if isinstance(default, Rate):
                default = str(default)
            elif isinstance(default, tuple):
                default = ",".join(map(str, default))
            rows.append(f"  {f.metadata['env']:<20} {f.metadata['help']} [default: {default}]")
        return "\n".join(rows)
