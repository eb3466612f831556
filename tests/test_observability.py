"""What operators watch: /metrics, the dashboard and alert rules, JSON logs, /readyz."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from core.infra.logs import JsonFormatter, TextFormatter
from core.infra.settings import Settings
from core.server import CoreServer
from tests.harness import (
    SECRET,
    ApiClient,
    http_url,
    running_gateway,
    token_for,
    unique_prefix,
    ws_client,
)
from tests.test_core_rest import PROJECT
from tests.test_websocket import fetch

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway.json"
#: Documented, stable metric names and their labels (docs/operations.md).
DOCUMENTED: dict[str, set[str]] = {
    "gateway_connections": {"transport"}, "gateway_handshakes": {"transport"},
    "gateway_handshake_failures": {"reason"}, "gateway_channels": set(), "gateway_subscriptions": set(),
    "gateway_publications": set(), "gateway_publications_not_json": set(),
    "gateway_messages_in": {"op"}, "gateway_messages_out": set(), "gateway_fanout_seconds": set(),
    "gateway_delivery_lag_seconds": set(), "gateway_slow_consumer_disconnects": set(),
    "gateway_dead_peer_disconnects": set(), "gateway_command_seconds": {"op"},
    "gateway_command_errors": {"code"}, "gateway_rest_request_seconds": {"route", "status"},
    "gateway_db_pool_connections": {"state"}, "gateway_db_pool_waiters": set(),
    "gateway_db_breaker_open": set(), "gateway_db_refused": set(),
    "gateway_broker_connected": set(), "gateway_broker_reconnects": set(),
    "gateway_rate_limited": {"scope"}, "gateway_publications_dropped": {"source"},
    "gateway_encode_failures": {"codec"}, "gateway_broker_faults": {"kind"},
    "gateway_redis_pool_connections": {"state"}, "gateway_redis_pool_waiters": set(),
    "gateway_send_buffered_bytes": set(), "gateway_subscription_repairs": set(),
    "gateway_accept_errors": {"errno"}, "gateway_answer_buffered_bytes": set(),
    "gateway_answer_budget_resets": set(),
    "gateway_core_upstream_seconds": set(), "gateway_core_upstream_errors": {"kind"},
    "gateway_core_pool_in_use": set(), "gateway_core_pool_size": set(),
    "gateway_core_breaker_open": set(), "gateway_adopted_connections": set(),
    "gateway_events_appended": {"type"}, "gateway_events_dropped": {"target"},
    "gateway_events_queued": {"target"}, "gateway_events_nodes_lost": set(),
    "gateway_events_webhook_deliveries": set(), "gateway_events_webhook_failures": {"kind"},
    "gateway_hook_calls": {"hook", "answer"}, "gateway_hook_errors": {"hook", "kind"},
    "gateway_hook_seconds": {"hook"}, "gateway_hook_breaker_open": {"hook"},
    "gateway_hook_in_flight": set(), "gateway_outbox_pending": set(),
    "gateway_outbox_relayed": set(), "gateway_write_timeouts": set(),
}  # fmt: skip
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")
#: PromQL words that look like metric names but are not.
_PROMQL = {"sum", "by", "rate", "increase", "min", "max", "on", "and", "or", "histogram_quantile",
           "without", "le", "ignoring", "group_left", "up", "avg", "count", "unless"}  # fmt: skip


@pytest.fixture
async def scraped(clean_db):
    """Family name -> samples of a gateway's /metrics after one of everything."""
    async with running_gateway(**clean_db) as gw:
        token = token_for(gw)
        async with ws_client(gw.port, token) as c:
            assert (await c.request("sub", ch="room:1"))["ok"]
            gw.hub.broadcast("room:1", b'{"x":1}')
            await c.next_push()
            api = ApiClient(gw.port, token_for(gw, extra={"role": "admin"}))
            try:
                status, _, _ = await api.call("POST", "/api/projects", PROJECT)
                assert status == 201
            finally:
                api.close()
            response = await fetch_metrics(gw)
    return {f.name: f.samples for f in text_string_to_metric_families(response)}


async def fetch_metrics(gw) -> str:
    from tornado.httpclient import AsyncHTTPClient

    http = AsyncHTTPClient(force_instance=True)
    try:
        response = await fetch(http, http_url(gw, "/metrics"))
    finally:
        http.close()
    return response.body.decode()


def _names(expr: str) -> set[str]:
    """The metric names a PromQL expression uses, suffixes folded to the family."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    names = set()
    for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if word in _PROMQL or word.isdigit():
            continue
        for suffix in _SUFFIXES:
            if word.endswith(suffix) and word.startswith(("gateway_", "process_")):
                word = word.removesuffix(suffix)
        names.add(word)
    return names


def _label_names(expr: str) -> set[str]:
    grouped = re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr)
    return {label.strip() for group in grouped for label in group.split(",") if label.strip()}


def _alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


async def test_every_documented_metric_is_exported_with_samples(scraped):
    missing = set(DOCUMENTED) - set(scraped)
    assert not missing, f"not in /metrics: {sorted(missing)}"
    families = {n.removesuffix("_created") for n in scraped if n.startswith("gateway_")}
    undocumented = families - set(DOCUMENTED)
    assert not undocumented, f"document these in docs/operations.md: {sorted(undocumented)}"
    for name, labels in DOCUMENTED.items():
        for sample in scraped[name]:
            assert set(sample.labels) - {"le"} <= labels, (name, sample.labels)
    for name in ("gateway_handshakes", "gateway_command_seconds", "gateway_rest_request_seconds",
                 "gateway_delivery_lag_seconds", "gateway_db_pool_connections"):  # fmt: skip
        assert scraped[name], f"{name} has no samples after a socket, a publication and a REST call"
    transports = {s.labels["transport"] for s in scraped["gateway_connections"]}
    assert transports == {"websocket", "sse", "longpoll"}
    routes = {s.labels["route"] for s in scraped["gateway_rest_request_seconds"]}
    assert "createProject" in routes or any("create" in r.lower() for r in routes), routes


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
async def test_alert_and_dashboard_expressions_name_real_metrics_and_labels(scraped, source):
    exprs = _alert_exprs() if source == "alerts" else _dashboard_exprs()
    assert exprs
    known_labels = {"instance", "job", "pod", "le", "worker"}.union(*DOCUMENTED.values())
    for expr in exprs:
        unknown = {n for n in _names(expr) if n not in scraped and n not in known_labels}
        assert not unknown, f"{expr!r} names {sorted(unknown)}, which /metrics does not export"
        stray = _label_names(expr) - known_labels
        assert not stray, f"{expr!r} groups by unknown labels {sorted(stray)}"


def test_alert_rules_are_well_formed():
    rules = yaml.safe_load(ALERTS.read_text())
    seen = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] not in seen and re.fullmatch(r"[A-Z][A-Za-z]+", rule["alert"])
            seen.add(rule["alert"])
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"]
            assert rule["expr"].count("(") == rule["expr"].count(")")


def test_the_name_check_catches_a_misspelt_metric():
    assert _names("sum(rate(gateway_conections_total[5m]))") == {"gateway_conections"}


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gateway.websocket", logging.INFO, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    return record


def test_json_log_lines_carry_context_and_never_a_token():
    line = JsonFormatter().format(
        _record("401 GET /ws?token=eyJhbGciOi.secret.sig&x=1", conn="c1", user="alice", code=4001)
    )
    fields = json.loads(line)
    assert fields["level"] == "info" and fields["logger"] == "gateway.websocket"
    assert (fields["conn"], fields["user"], fields["code"]) == ("c1", "alice", 4001)
    assert fields["ts"].endswith("+00:00")
    assert "secret" not in line and "token=[redacted]" in fields["message"]
    text = TextFormatter().format(_record("GET /sse?access_token=abc", user="bob"))
    assert "abc" not in text and text.endswith("[user=bob]")


async def test_socket_open_and_close_are_logged_with_the_close_code(caplog):
    async with running_gateway() as gw:
        with caplog.at_level(logging.INFO, logger="gateway.websocket"):
            async with ws_client(gw.port, token_for(gw, sub="carol")) as c:
                await c.request("ping")
            for _ in range(50):
                if any(r.getMessage() == "socket closed" for r in caplog.records):
                    break
                await asyncio.sleep(0.02)
    opened = [r for r in caplog.records if r.getMessage() == "socket open"]
    closed = [r for r in caplog.records if r.getMessage() == "socket closed"]
    assert opened and opened[0].__dict__["user"] == "carol"
    assert closed and closed[0].__dict__["code"] == 1000


async def test_readiness_reports_broker_and_database(clean_db):
    from tornado.httpclient import AsyncHTTPClient

    http = AsyncHTTPClient(force_instance=True)
    try:
        async with running_gateway(**clean_db) as gw:
            ok = await fetch(http, http_url(gw, "/readyz"))
            assert ok.code == 200
            assert json.loads(ok.body) == {"status": "ok", "broker": True, "database": True}
            await gw.ctx.core.db.pool.close()  # the database is gone for this process
            await asyncio.sleep(1.0)  # readiness is checked at most once a second
            down = await fetch(http, http_url(gw, "/readyz"))
            assert down.code == 503 and json.loads(down.body)["database"] is False
            assert (await fetch(http, http_url(gw, "/healthz"))).code == 200
        async with running_gateway() as gw:  # no database configured: sockets only, still ready
            body = json.loads((await fetch(http, http_url(gw, "/readyz"))).body)
            assert body == {"status": "ok", "broker": True, "database": None}
    finally:
        http.close()


class _CountingPool:
    """A pool that counts the ``select 1`` it runs (readiness checks); the rest is the pool's."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.checks = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def fetchval(self, query: str, *args: Any, **kw: Any) -> Any:
        self.checks += query == "select 1"
        return await self._pool.fetchval(query, *args, **kw)


async def _ask_readiness(port: int, connections: int, seconds: float) -> dict[bytes, int]:
    """``connections`` clients, no token, each asking ``/readyz`` again as soon as answered."""
    statuses: dict[bytes, int] = {}

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: gw\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1]
                statuses[status] = statuses.get(status, 0) + 1
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return statuses


async def test_anyone_s_readiness_flood_costs_one_check_a_second(clean_db, redis_url):
    """200 clients without a token asking ``/readyz`` in a loop ran a ``select 1`` on the REST
    pool and a Redis PING for each answer (~1,000 a second), and the checks that waited past
    their second opened the database's breaker (REST 503 for every user, readiness red)."""
    async with running_gateway(**clean_db, redis_url=redis_url, redis_prefix=unique_prefix()) as gw:
        db = gw.ctx.core.db
        pool = db.pool = _CountingPool(db.pool)
        broker = gw.ctx.node.broker
        pings = 0
        ping = broker.healthy

        async def counted() -> bool:
            nonlocal pings
            pings += 1
            return await ping()

        broker.healthy = counted
        started = time.monotonic()
        statuses = await _ask_readiness(gw.port, 200, 1.5)
        took = time.monotonic() - started
        assert statuses == {b"200": statuses.get(b"200", 0)}, statuses
        assert sum(statuses.values()) >= 200
        assert pool.checks <= took + 2 and pings <= took + 2, (pool.checks, pings, statuses)
        assert db.breaker.state == "closed"


async def test_the_standalone_core_s_readiness_is_checked_once_a_second(clean_db):
    settings = Settings(jwt_secret=SECRET, host="127.0.0.1", port=0, **clean_db)
    server = await CoreServer.start(settings)
    try:
        db = server.core.db
        pool = db.pool = _CountingPool(db.pool)
        started = time.monotonic()
        statuses = await _ask_readiness(server.port, 100, 1.0)
        took = time.monotonic() - started
        assert statuses == {b"200": statuses.get(b"200", 0)} and sum(statuses.values()) >= 100
        assert pool.checks <= took + 2, (pool.checks, statuses)
    finally:
        await server.close()


async def test_readiness_tells_where_the_core_and_hooks_are_only_to_the_scraper():
    """``/readyz`` is anyone's: it told every client without a token the core's and the hooks'
    internal URLs, the core pool's load and their last errors (internal addresses). With
    ``METRICS_TOKEN`` set, they are for its bearer; anyone sees the states."""
    scrape = "scrape-" + "x" * 32
    hooked = "http://10.0.0.7:8001/internal/subscribe"
    async with running_gateway(
        core_url="http://127.0.0.1:1/core", hook_subscribe_url=hooked,
        hook_secret="h" * 32, metrics_token=scrape,
    ) as gw:  # fmt: skip
        api = ApiClient(gw.port, token_for(gw))
        try:
            assert (await api.call("GET", "/api/projects"))[0] == 503  # the core is unreachable
            _, _, anyone = await api.call("GET", "/readyz", headers={"Authorization": ""})
            await asyncio.sleep(1.0)  # a new check: the scraper sees the same moment's
            _, _, scraper = await api.call(
                "GET", "/readyz", headers={"Authorization": f"Bearer {scrape}"}
            )
        finally:
            api.close()
    text = json.dumps(anyone)
    assert "10.0.0.7" not in text and "127.0.0.1" not in text and "Errno" not in text, text
    assert anyone["core"] == {"reachable": False, "breaker": "closed"}
    assert anyone["hooks"] == {"subscribe": {"breaker": "closed"}}
    assert scraper["core"]["url"] == "http://127.0.0.1:1/core"
    assert "Errno" in scraper["core"]["last_error"] and scraper["core"]["pool"] == 64
    assert scraper["hooks"]["subscribe"]["url"] == hooked


def test_the_loop_histogram_is_exposed_as_prometheus_client_s_histogram():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from core.infra.metrics import LoopHistogram

    buckets = (0.0005, 0.001, 0.0025, 1.0)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("t_seconds", "Time.", buckets, ours)
    reference = Histogram("t_seconds", "Time.", buckets=buckets, registry=theirs)
    by_op = LoopHistogram("u_seconds", "Time by op.", buckets, ours, ("op",))
    reference_by_op = Histogram(
        "u_seconds", "Time by op.", ["op"], buckets=buckets, registry=theirs
    )
    for n, seconds in enumerate((0.0001, 0.0005, 0.0007, 0.001, 0.003, 1.0, 1.5, 100.0)):
        loop.observe(seconds)
        reference.observe(seconds)
        op = ("sub", "rpc")[n % 2]
        by_op.labels(op).observe(seconds)
        reference_by_op.labels(op).observe(seconds)
    expected = [
        line for line in generate_latest(theirs).decode().splitlines() if "_created" not in line
    ]
    assert generate_latest(ours).decode().splitlines() == expected
    assert 't_seconds_bucket{le="0.0005"} 2.0' in expected  # a bound holds what equals it
    assert 'u_seconds_bucket{le="+Inf",op="rpc"} 4.0' in expected
    with pytest.raises(ValueError):
        by_op.labels("sub", "extra")
