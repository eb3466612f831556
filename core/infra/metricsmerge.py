"""One ``/metrics`` answer for several worker processes.

Each worker keeps its own registry (prometheus-client's multiprocess mode
does not fit: it replaces registries with files and has no callback gauges).
A worker saves a snapshot of its samples to ``<dir>/worker-<index>.msgpack``
every second, writing a temporary file and renaming it over the old one so
a reader never sees half a snapshot, and removes it when it stops.

A scrape lands on any one worker. It answers with its own live samples and
every sibling's latest snapshot, each sample labelled ``worker="<index>"``
and each metric family emitted once. A snapshot older than ``MAX_AGE`` is
skipped: its worker stopped writing, so it is gone or stuck.

With one process there is no directory and ``/metrics`` is the registry as
it is, with no ``worker`` label.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["WorkerRegistry", "decode", "encode", "merge", "scrape_view", "snapshot_path"]

#: Seconds after which a sibling's snapshot no longer counts.
MAX_AGE = 10.0

_SNAPSHOT = re.compile(r"worker-(\d+)\.msgpack")


class _Sample(msgspec.Struct, array_like=True):
    name: str
    labels: dict[str, str]
    value: float
    timestamp: float | None = None


class _Family(msgspec.Struct, array_like=True):
    name: str
    type: str
    help: str
    unit: str
    samples: list[_Sample]


# msgpack rather than JSON: it keeps NaN and infinities, which JSON cannot hold.
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[_Family])


def encode(families: Iterable[Metric]) -> bytes:
    """A snapshot of collected families (exemplars are left out)."""
    return _encoder.encode(
        [
            _Family(
                m.name,
                m.type,
                m.documentation,
                m.unit,
                [
                    _Sample(
                        s.name,
                        s.labels,
                        s.value,
                        None if s.timestamp is None else float(s.timestamp),
                    )
                    for s in m.samples
                ],
            )
            for m in families
        ]
    )


def decode(data: bytes) -> list[Metric]:
    """The families of a snapshot (raises msgspec.DecodeError if it is not one)."""
    families = []
    for f in _decoder.decode(data):
        metric = Metric(f.name, f.help, f.type, f.unit)
        for s in f.samples:
            metric.add_sample(s.name, s.labels, s.value, s.timestamp)
        families.append(metric)
    return families


def merge(workers: Iterable[tuple[int, Iterable[Metric]]]) -> list[Metric]:
    """Every worker's families as one list, each family once, samples labelled by worker."""
    merged: dict[str, Metric] = {}
    for index, families in sorted(workers, key=lambda pair: pair[0]):
        worker = str(index)
        for m in families:
            family = merged.get(m.name)
            if family is None:
                family = merged[m.name] = Metric(m.name, m.documentation, m.type, m.unit)
            for s in m.samples:
                family.add_sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp)
    return list(merged.values())


def snapshot_path(directory: str, index: int) -> Path:
    return Path(directory) / f"worker-{index}.msgpack"


class WorkerRegistry(CollectorRegistry):
    """A worker's own registry, which also knows where its siblings' snapshots are.

    ``collect()`` is this worker's samples only, as for any registry;
    ``scrape_view`` adds the siblings'.
    """

    def __init__(self, index: int, directory: str) -> None:
        super().__init__()
        self.index = index
        self.directory = directory

    def save(self) -> None:
        """Write this worker's snapshot, replacing the previous one at once."""
        path = snapshot_path(self.directory, self.index)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(encode(self.collect()))
        os.replace(partial, path)

    def remove(self) -> None:
        snapshot_path(self.directory, self.index).unlink(missing_ok=True)

    def siblings(self, now: float) -> Iterator[tuple[int, list[Metric]]]:
        """(index, families) of every other worker with a fresh snapshot."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            match = _SNAPSHOT.fullmatch(name)
            if match is None or int(match[1]) == self.index:
                continue
            path = Path(self.directory, name)
            try:
                if now - path.stat().st_mtime > MAX_AGE:
                    continue
                families = decode(path.read_bytes())
            except (OSError, msgspec.DecodeError, ValueError):
                continue  # removed meanwhile, or not a snapshot
            yield int(match[1]), families


class _AllWorkers:
    def __init__(self, registry: WorkerRegistry, now: float) -> None:
        self.registry = registry
        self.now = now

    def collect(self) -> list[Metric]:
        own = (self.registry.index, list(self.registry.collect()))
        return merge([own, *self.registry.siblings(self.now)])


def scrape_view(registry: CollectorRegistry, now: float) -> Collector:
    """What ``/metrics`` shows: the registry, or with workers, every worker's samples."""
    if isinstance(registry, WorkerRegistry):
        return _AllWorkers(registry, now)
    return registry
