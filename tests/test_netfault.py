"""Faults across a real network: gateway hosts, Redis (and a Redis Cluster), PostgreSQL and
clients in network namespaces (tests/netns.py), partitioned, cut, slowed and failed over.

Every scenario numbers its publications and checks, for each client, that each one it was
owed arrived exactly once, or that the client was told it may be missing (a `Gap`, which the
Python client yields for a ``gap`` push it could not repair from history and for
``recovered: false``). Each records its figures (tests/netfault.py; ``python -m
tests.netfault`` prints them) and docs/operations.md quotes them. Marked ``netfault``; skipped,
with the reason in the pytest header, where the machine cannot build namespaces (not root, no
``ip``). docs/testing.md shows how to run one scenario, or build the network, by hand.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from core.infra.settings import Settings
from gateway.client import Client, Publication
from tests.netclients import (
    FAST,
    Verdict,
    hold_socket,
    load,
    percentile,
    present_at_least,
    published_between,
    watch_raw,
)
from tests.netfault import record
from tests.nethosts import (
    CLUSTER_PORTS,
    PING_INTERVAL,
    PONG_TIMEOUT,
    SWEEP,
    TOKEN,
    accepts,
    balance,
    base,
    cli,
    http,
    is_ready,
    log_lines,
    metric,
    metric_at_most,
    owner,
    ready,
    samples,
    start_cluster,
    start_gateway,
    start_postgres,
    start_redis,
    unready,
    wait_for,
    ws_url,
)
from tests.netns import Network, leftovers, netns_problem
from tests.servers import UNIT, postgres_dir

#: The shipped DB_COMMAND_TIMEOUT, which the PostgreSQL partition runs with.
DB_COMMAND_TIMEOUT = Settings().db_command_timeout

PROBLEM = netns_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"netfault: {PROBLEM}")


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    """A fresh network; at teardown, even after a failure, nothing of it may be left."""
    net = Network(tmp_path)
    try:
        yield net
    finally:
        net.close()
        left = leftovers(net.prefix, tmp_path)
        assert not left, f"left behind: {left}"


async def test_a_gateway_cut_off_from_redis_tells_its_clients_and_recovers(network: Network):
    redis, gw1, gw2, clients = (network.host(n) for n in ("redis", "gw1", "gw2", "clients"))
    start_redis(redis)
    url = f"redis://{redis.ip}:6379/0"
    p1, _ = start_gateway(gw1, REDIS_URL=url), start_gateway(gw2, REDIS_URL=url)
    await ready(clients, gw1, gw2)
    channel = ("nf:1",)
    async with load() as run:
        cut_off = await run.readers_on(clients, ws_url(gw1), 3, channel, "gw1-")
        others = await run.readers_on(clients, ws_url(gw2), 2, channel, "gw2-")
        pushes: list[tuple[float, dict[str, Any]]] = []
        raw = clients.submit(watch_raw(ws_url(gw1), "nf:1", pushes))
        run.publish(clients, ws_url(gw2), channel, 0.02)
        await asyncio.sleep(1.0)

        network.partition(gw1, redis)
        cut = time.monotonic()
        detect = await wait_for(lambda: clients.run(unready(gw1)), 10)
        during = await samples(gw1, clients, "gateway_broker_connected")
        readiness = json.loads((await clients.run(http(base(gw1) + "/readyz", 3)))[1])
        await asyncio.sleep(max(0.0, cut + 10.0 - time.monotonic()))
        network.heal(gw1, redis)
        healed = time.monotonic()
        recover = await wait_for(lambda: clients.run(is_ready(gw1)), 15)
        await wait_for(lambda: any(p.get("op") == "gap" for _, p in pushes), 10)
        told = min(at for at, p in pushes if p.get("op") == "gap") - healed
        await asyncio.sleep(1.0)
        owed = await run.stop_publishing()
        await run.caught_up(cut_off + others)
        raw.cancel()
        verdicts = {r.name: r.verdict(owed) for r in run.readers}
        reconnects = await metric(gw1, clients, "gateway_broker_reconnects_total")
    assert during == {"gateway_broker_connected": 0.0} and readiness["broker"] is False
    for name, v in verdicts.items():
        assert v.duplicates == 0 and v.silently_lost == [], (name, v)
    assert all(r.client is not None and r.client.connections == 1 for r in cut_off), (
        "the sockets stay open through a Redis outage"
    )
    missed_live = published_between(run, cut, healed)
    record(
        "redis_partition",
        partition_seconds=healed - cut,
        readiness_red_after=detect,
        readiness_green_after_heal=recover,
        gap_push_after_heal=told,
        published_during_partition=missed_live,
        recovered_per_client=min(missed_live - verdicts[r.name].missing for r in cut_off),
        reported_lost_per_client=max(verdicts[r.name].reported for r in cut_off),
        silently_lost=sum(len(v.silently_lost) for v in verdicts.values()),
        broker_reconnects_metric=reconnects,
        metrics_during_partition=during,
        readyz_during_partition=readiness,
        log=log_lines(p1, "redis", "broker", "gap"),
    )


async def test_a_client_host_that_vanishes_is_detected_freed_and_leaves_presence(
    network: Network,
):
    gw, lost, clients = (network.host(n) for n in ("gw", "lost", "clients"))
    gateway = start_gateway(gw)
    await ready(clients, gw)
    sockets = 20
    held = [lost.submit(hold_socket(ws_url(gw), "nf:presence")) for _ in range(sockets)]
    observer = Client(ws_url(gw), token=TOKEN, backoff=FAST, transports=("websocket",))
    await clients.run(observer.connect())

    async def present() -> int:
        return len(await clients.run(observer.presence("nf:presence")))

    await wait_for(lambda: present_at_least(present, sockets), 10)
    connections = await metric(gw, clients, "gateway_connections")
    network.isolate(lost)
    cut = time.monotonic()
    detect = await wait_for(
        lambda: metric_at_most(gw, clients, "gateway_connections", connections - sockets), 15
    )
    await wait_for(lambda: present_at_least(present, 0, exactly=True), 5)
    presence_gone = time.monotonic() - cut
    dead = await metric(gw, clients, "gateway_dead_peer_disconnects_total")
    subscriptions = await metric(gw, clients, "gateway_subscriptions")
    buffered = await metric(gw, clients, "gateway_send_buffered_bytes")
    await clients.run(observer.close())
    for future in held:
        future.cancel()
    assert dead == sockets, "each one dropped as a dead peer"
    assert detect <= (PING_INTERVAL + PONG_TIMEOUT + 2 * SWEEP) * UNIT
    assert subscriptions == 0 and buffered == 0, "nothing of them is kept"
    record(
        "client_host_vanishes",
        sockets=sockets,
        ping_interval=PING_INTERVAL,
        pong_timeout=PONG_TIMEOUT,
        all_dropped_after=detect,
        presence_empty_after=presence_gone,
        dead_peer_disconnects_metric=dead,
        log=log_lines(gateway, "dropping"),
    )


async def test_a_draining_gateway_hands_its_clients_to_the_other_host(network: Network):
    redis, gw1, gw2, lb, clients = (
        network.host(n) for n in ("redis", "gw1", "gw2", "lb", "clients")
    )
    start_redis(redis)
    url = f"redis://{redis.ip}:6379/0"
    p1, _ = start_gateway(gw1, REDIS_URL=url), start_gateway(gw2, REDIS_URL=url)
    await ready(clients, gw1, gw2)
    chosen: list[str] = []
    balancer = lb.submit(balance(lb, (gw1, gw2), chosen))
    channel = ("nf:drain",)
    async with load() as run:
        readers = await run.readers_on(clients, ws_url(lb), 10, channel, "via-lb-")
        assert set(chosen) == {"gw1"}
        run.publish(clients, ws_url(gw2), channel, 0.02)
        await asyncio.sleep(0.5)
        p1.signal(signal.SIGTERM)
        term = time.monotonic()
        moved = await wait_for(
            lambda: all(r.client is not None and r.client.connections == 2 for r in readers),
            15,
            state=lambda: (
                [
                    (r.client.connections, r.client.state.value) if r.client else None
                    for r in readers
                ],
                chosen,
                balancer,
                log_lines(p1, "", limit=20),
            ),
        )
        exit_code = await asyncio.to_thread(p1.wait, 10 * UNIT)
        exited = time.monotonic() - term
        await asyncio.sleep(0.5)
        owed = await run.stop_publishing()
        await run.caught_up(readers)
        on_gw2 = await metric(gw2, clients, "gateway_connections")
    balancer.cancel()
    verdicts = [r.verdict(owed) for r in readers]
    assert exit_code == 0
    assert chosen.count("gw2") >= len(readers), "every reader reconnected to the other host"
    assert on_gw2 >= len(readers)
    for v in verdicts:
        assert v == Verdict(duplicates=0, missing=0, reported=0, silently_lost=[]), v
    assert all(r.recovered() for r in readers)
    record(
        "sigterm_drain_across_hosts",
        clients=len(readers),
        drain_seconds=1.0,
        all_clients_on_the_other_host_after=moved,
        gateway_exited_after=exited,
        exit_code=exit_code,
        published_while_moving=published_between(run, term, term + moved),
        recovered_per_client=published_between(run, term, term + moved),
        reported_lost=sum(v.reported for v in verdicts),
        silently_lost=sum(len(v.silently_lost) for v in verdicts),
        log=log_lines(p1, "drain", "shutdown", "stopp"),
    )


async def test_postgresql_behind_a_partition_is_a_quick_503_and_the_pool_heals(
    network: Network,
):
    db, gw, clients = (network.host(n) for n in ("db", "gw", "clients"))
    with postgres_dir() as directory:
        start_postgres(db, directory)
        database = f"postgresql://postgres@{db.ip}:5432/postgres"
        await wait_for(lambda: clients.run(accepts(db.ip, 5432)), 20)
        process = start_gateway(
            gw,
            CORE_URL="",
            DATABASE_URL=database,
            DATABASE_SCHEMA="netfault",
            MIGRATE_ON_START="true",
            DB_POOL_MIN="2",
        )  # fmt: skip  (DB_COMMAND_TIMEOUT, DB_CONNECT_TIMEOUT, DB_PROBE_TIMEOUT: the defaults)
        await ready(clients, gw)
        api = base(gw) + "/api/projects"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await clients.run(http(api, headers=auth)))[0] == 200
        async with load() as run:
            (reader,) = await run.readers_on(clients, ws_url(gw), 1, ("nf:db",), "socket-")
            run.publish(clients, ws_url(gw), ("nf:db",), 0.05)
            network.partition(gw, db)
            cut = time.monotonic()
            red_task = asyncio.ensure_future(wait_for(lambda: clients.run(unready(gw)), 10))
            answers = []
            for _ in range(3):
                asked = time.monotonic()
                code, body = await clients.run(http(api, DB_COMMAND_TIMEOUT + 10, headers=auth))
                answers.append((code, time.monotonic() - asked))
            red = await red_task
            readiness = json.loads((await clients.run(http(base(gw) + "/readyz", 3)))[1])
            pool_during = await samples(gw, clients, "gateway_db_pool_connections")
            breaker_during = await metric(gw, clients, "gateway_db_breaker_open")
            refused = await metric(gw, clients, "gateway_db_refused_total")
            during = len(reader.numbers())
            await asyncio.sleep(1.0)
            assert len(reader.numbers()) > during, "the socket is served meanwhile"
            network.heal(gw, db)
            healed = time.monotonic()

            async def rest_ok() -> bool:
                return (await clients.run(http(api, 5, headers=auth)))[0] == 200

            heal = await wait_for(rest_ok, 15)
            owed = await run.stop_publishing()
            await run.caught_up([reader])
            verdict = reader.verdict(owed)
            pool = await samples(gw, clients, "gateway_db_pool_connections")
            breaker_after = await metric(gw, clients, "gateway_db_breaker_open")
    assert [code for code, _ in answers] == [503] * 3
    assert json.loads(body)["error"]["code"] == "unavailable"
    # The first call waits out the command timeout once (twice before: asyncpg's cancel
    # round trip to a server out of reach); the ones after it are refused at once.
    assert answers[0][1] < DB_COMMAND_TIMEOUT + 5.0, answers
    assert all(seconds < DB_COMMAND_TIMEOUT / 4 for _, seconds in answers[1:]), answers
    assert readiness["database"] is False
    assert breaker_during == 1 and breaker_after == 0 and refused >= 2
    assert verdict == Verdict(0, 0, 0, []) and reader.client is not None
    assert reader.client.connections == 1
    record(
        "postgresql_partition",
        first_503_after=answers[0][1],
        later_503s_after=[seconds for _, seconds in answers[1:]],
        db_command_timeout=DB_COMMAND_TIMEOUT,
        breaker_open_during=breaker_during,
        refused_during=refused,
        readiness_red_after=red,
        rest_200_after_heal=heal,
        partition_seconds=healed - cut,
        socket_publications_meanwhile=len(reader.numbers()),
        socket_publications_lost=verdict.missing,
        readyz_during_partition=readiness,
        metrics_during_partition=pool_during,
        metrics_after_heal=pool,
        log=log_lines(process, "database", "postgres", "pool", "unavailable", limit=5),
    )


#: netem's "delay 100ms loss 2%" on both ends of the clients' link, for this long.
DELAY = 0.1
LOSS = 0.02
SHAPED_SECONDS = 8.0


async def test_latency_and_loss_to_the_clients_drop_no_healthy_client(network: Network):
    redis, gw1, gw2, source = (network.host(n) for n in ("redis", "gw1", "gw2", "source"))
    clients = network.host("clients", shaped=True)
    start_redis(redis)
    url = f"redis://{redis.ip}:6379/0"
    gateways = [start_gateway(gw1, REDIS_URL=url), start_gateway(gw2, REDIS_URL=url)]
    await ready(source, gw1, gw2)
    channel = ("nf:far",)
    async with load() as run:
        readers = await run.readers_on(clients, ws_url(gw1), 5, channel, "gw1-")
        readers += await run.readers_on(clients, ws_url(gw2), 5, channel, "gw2-")
        network.shape(clients, DELAY, LOSS)
        shaped = time.monotonic()
        run.publish(source, ws_url(gw1), channel, 0.05)
        await asyncio.sleep(SHAPED_SECONDS)
        owed = await run.stop_publishing()
        await run.caught_up(readers)
        network.shape(clients, 0.0, 0.0)
        dead = [await metric(g, source, "gateway_dead_peer_disconnects_total") for g in (gw1, gw2)]
    lags = sorted(
        at - event.data["t"]
        for r in readers
        for at, event in r.events
        if isinstance(event, Publication) and at > shaped
    )
    verdicts = [r.verdict(owed) for r in readers]
    assert dead == [0, 0], "no healthy client dropped as dead"
    assert all(r.client is not None and r.client.connections == 1 for r in readers)
    for v in verdicts:
        assert v == Verdict(0, 0, 0, []), v
    record(
        "latency_and_loss_to_clients",
        delay_each_way=DELAY,
        loss=LOSS,
        clients=len(readers),
        seconds=SHAPED_SECONDS,
        deliveries=len(lags),
        lag_p50=percentile(lags, 0.50),
        lag_p99=percentile(lags, 0.99),
        lag_max=lags[-1],
        dead_peer_disconnects=sum(dead),
        reconnects=sum(r.client.connections - 1 for r in readers if r.client is not None),
        log=log_lines(gateways[0], "dropping", "slow"),
    )


async def test_a_cluster_primary_killed_under_load_fails_over_and_clients_are_told(
    network: Network,
):
    rc, gw1, gw2, clients = (network.host(n) for n in ("cluster", "gw1", "gw2", "clients"))
    nodes = await asyncio.to_thread(start_cluster, rc)
    env = {"REDIS_URL": f"redis://{rc.ip}:7000/0", "REDIS_CLUSTER": "yes"}
    gateways = [start_gateway(gw1, **env), start_gateway(gw2, **env)]
    await ready(clients, gw1, gw2)
    channels = tuple(f"nf:c{i}" for i in range(6))
    slot = key_slot(b"gw:{nf:c0}")
    victim = await asyncio.to_thread(owner, rc, CLUSTER_PORTS[0], slot)
    assert victim is not None
    witness = next(p for p in CLUSTER_PORTS[:3] if p != victim)
    async with load() as run:
        readers = await run.readers_on(clients, ws_url(gw1), 3, channels, "gw1-")
        readers += await run.readers_on(clients, ws_url(gw2), 3, channels, "gw2-")
        run.publish(clients, ws_url(gw2), channels, 0.01)
        await asyncio.sleep(1.0)
        nodes[victim].kill()
        killed = time.monotonic()

        async def promoted() -> bool:
            now = await asyncio.to_thread(owner, rc, witness, slot)
            return now not in (None, victim)

        failover = await wait_for(promoted, 20)
        promoted_port = await asyncio.to_thread(owner, rc, witness, slot)
        assert promoted_port is not None
        before = len(readers[0].numbers("nf:c0"))
        await wait_for(lambda: len(readers[0].numbers("nf:c0")) > before, 15)
        flowing = time.monotonic() - killed
        await asyncio.sleep(1.0)
        await run.stop_publishing()
        assert run.publisher is not None
        await run.caught_up(readers, 20)
        failed = run.publisher.failed
        held = cli(rc, promoted_port, "pubsub", "shardchannels", "gw:*").split()
        metrics = {
            name: sum([await metric(g, clients, name) for g in (gw1, gw2)])
            for name in ("gateway_broker_reconnects_total", "gateway_broker_faults_total")
        }
    per_channel = {
        ch: [r.verdict(run.publisher.acked.get(ch, set()), ch) for r in readers] for ch in channels
    }
    for ch, verdicts in per_channel.items():
        for r, v in zip(readers, verdicts, strict=True):
            assert v.duplicates == 0 and v.silently_lost == [], f"{ch} {v} {r.name}: {r.trace(ch)}"
    victims = per_channel["nf:c0"]
    assert "gw:{nf:c0}" in held, "the gateways resubscribed the shard on the promoted replica"
    # The promoted replica may lack what the dead primary acknowledged last, and
    # cannot say: every client of its channels is told, none silently misses one.
    assert min(r.gaps("nf:c0") for r in readers) >= 1
    epochs = {e.epoch for r in readers for _, e in r.events if isinstance(e, Publication)
              and e.channel == "nf:c0"}  # fmt: skip
    record(
        "redis_cluster_primary_killed",
        cluster="3 primaries + 1 replica each, cluster-node-timeout 1000 ms",
        replica_promoted_after=failover,
        victim_channel_flowing_again_after=flowing,
        publishes_refused_during_failover=failed,
        publish_errors=sorted(run.publisher.errors),
        missing_on_victim_channel_per_client=max(v.missing for v in victims),
        reported_lost_per_client=max(v.reported for v in victims),
        gaps_per_client=max(r.gaps("nf:c0") for r in readers),
        epoch_changed=len(epochs) > 1,
        silently_lost=sum(len(v.silently_lost) for vs in per_channel.values() for v in vs),
        **{k: v for k, v in metrics.items()},
        log=log_lines(gateways[0], "redis", "moved", "cluster", "gap"),
    )
