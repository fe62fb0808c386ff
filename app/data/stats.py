"""Skip-and-count bookkeeping for data pipelines.

Preprocessing runs in many Ray Data tasks; each sends its counts (rows read, kept, skipped by
reason) and a few examples of skipped rows (shard, key, reason) to one small actor per run, which
the trainer reads to log them to MLflow and to enforce `data.max_skipped_fraction`.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import ray

from app.errors import UserError

class DataError(UserError, ValueError):
    """The data produced nothing to train on, or more unusable samples than `data.max_skipped_fraction`."""


MAX_EXAMPLES = 20
# The skipped fraction is judged once this many rows were read (or at the end of the run).
MIN_ROWS_FOR_FRACTION = 200


@ray.remote(num_cpus=0)
class DataCounter:
    def __init__(self) -> None:
        self._counts: Counter = Counter()
        self._examples: list[dict[str, str]] = []

    def add(self, counts: dict[str, int], examples: Optional[list[dict[str, str]]] = None) -> None:
        self._counts.update(counts)
        if examples:
            self._examples.extend(examples[: MAX_EXAMPLES - len(self._examples)])

    def get(self) -> dict[str, int]:
        return dict(self._counts)

    def examples(self) -> list[dict[str, str]]:
        return list(self._examples)


def create_counter() -> "ray.actor.ActorHandle":
    return DataCounter.remote()


def report_counts(counter: Optional["ray.actor.ActorHandle"], counts: dict[str, int],
                  examples: Optional[list[dict[str, str]]] = None) -> None:
    """Waits for the actor (one round trip per preprocessing batch), so counts are complete once a batch is out."""
    if counter is not None and counts:
        ray.get(counter.add.remote(dict(counts), examples[:MAX_EXAMPLES] if examples else None))


def read_counts(counter: Optional["ray.actor.ActorHandle"], timeout_s: float = 10.0) -> dict[str, int]:
    if counter is None:
        return {}
    return ray.get(counter.get.remote(), timeout=timeout_s)


def read_examples(counter: Optional["ray.actor.ActorHandle"], timeout_s: float = 10.0) -> list[dict[str, str]]:
    if counter is None:
        return []
    return ray.get(counter.examples.remote(), timeout=timeout_s)


def skipped_problem(counts: dict[str, int], limit: float, examples: list[dict[str, str]],
                    final: bool = False, prefix: str = "") -> Optional[str]:
    """A message when more than `limit` of the rows read were skipped (None if within the limit).

    Only counts whose key starts with `prefix` are judged (e.g. "" for training, "val_" for validation).
    Before `final`, nothing is judged until MIN_ROWS_FOR_FRACTION rows were read.
    """
    read = counts.get(f"{prefix}rows_read", 0)
    skipped = {k[len(prefix):]: v for k, v in counts.items()
               if k.startswith(f"{prefix}skipped_") and (prefix or not k.startswith("val_"))}
    total = sum(skipped.values())
    if read == 0 or (not final and read < MIN_ROWS_FOR_FRACTION) or total / read <= limit:
        return None
    reasons = ", ".join(f"{k.removeprefix('skipped_')}: {v}" for k, v in sorted(skipped.items()))
    examples = [e for e in examples if e["reason"].startswith(prefix) and (prefix or not e["reason"].startswith("val_"))]
    shown = "; ".join(f"{e['shard']} key {e['key']!r}: {e['reason'][len(prefix):]}" for e in examples[:5])
    return (f"{total} of {read} samples were unusable ({total / read:.1%} > data.max_skipped_fraction "
            f"{limit:g}; {reasons}); e.g. {shown or 'no examples recorded'}")
