"""Brokers move publications between gateway processes (see base.py)."""

from __future__ import annotations

from typing import Any

from core.infra.broker.base import (
    CONTROL,
    UNTRUSTED_EPOCH,
    Broker,
    BrokerUnavailable,
    Entry,
    EventBatch,
    Position,
    PublicationHandler,
    StateListener,
)
from core.infra.broker.cluster import RedisClusterBroker
from core.infra.broker.memory import MemoryBroker
from core.infra.broker.redis import RedisBroker
from core.infra.settings import Settings

__all__ = [
    "CONTROL",
    "UNTRUSTED_EPOCH",
    "Broker",
    "BrokerUnavailable",
    "Entry",
    "EventBatch",
    "MemoryBroker",
    "Position",
    "PublicationHandler",
    "RedisBroker",
    "RedisClusterBroker",
    "StateListener",
    "make_broker",
]


def make_broker(settings: Settings) -> Broker:
    """Redis (a Redis Cluster with ``REDIS_CLUSTER``) when ``REDIS_URL`` is set,
    else the single-process memory broker."""
    health: dict[str, Any] = {
        "health_interval": settings.redis_health_interval,
        "health_timeout": settings.redis_health_timeout,
        "pool_size": settings.redis_pool_size,
        "pool_timeout": settings.redis_pool_timeout,
    }
    if settings.redis_url and settings.redis_cluster:
        return RedisClusterBroker(settings.redis_url, settings.redis_prefix, **health)
    if settings.redis_url:
        return RedisBroker(settings.redis_url, settings.redis_prefix, **health)
    return MemoryBroker()
