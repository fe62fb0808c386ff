"""Skip-and-count bookkeeping for data pipelines.

Preprocessing runs in many Ray Data tasks; each sends its counts (rows read, kept, skipped by
reason) to one small actor per run, which the trainer reads to log them to MLflow.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import ray


@ray.remote(num_cpus=0)
class DataCounter:
    def __init__(self) -> None:
        self._counts: Counter = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self._counts.update(counts)

    def get(self) -> dict[str, int]:
        return dict(self._counts)


def create_counter() -> "ray.actor.ActorHandle":
    return DataCounter.remote()


def report_counts(counter: Optional["ray.actor.ActorHandle"], counts: dict[str, int]) -> None:
    """Waits for the actor (one round trip per batch of ~1k rows), so counts are complete once a batch is out."""
    if counter is not None and counts:
        ray.get(counter.add.remote(dict(counts)))


def read_counts(counter: Optional["ray.actor.ActorHandle"], timeout_s: float = 10.0) -> dict[str, int]:
    if counter is None:
        return {}
    return ray.get(counter.get.remote(), timeout=timeout_s)
