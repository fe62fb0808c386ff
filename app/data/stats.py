"""Skip-and-count bookkeeping for data pipelines.

Preprocessing runs in many Ray Data tasks; each sends its counts (rows read, kept, skipped by
reason) and a few examples of skipped rows (shard, key, reason) to one small actor per run, which
the trainer reads to log them to MLflow and to enforce `data.max_skipped_fraction`.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import ray

from app.data.progress import ROW_BITS, ROW_MASK
from app.errors import UserError

class DataError(UserError, ValueError):
    """The data produced nothing to train on, or more unusable samples than `data.max_skipped_fraction`."""


MAX_EXAMPLES = 20
# The skipped fraction is judged once this many rows were read (or at the end of the run).
MIN_ROWS_FOR_FRACTION = 200


@ray.remote(num_cpus=0)
class DataCounter:
    """The run's data actor: counts and examples of skipped rows, and what the training read of the current
    epoch leaves out (see `app.data.progress`): the epoch (it seeds the file order), the rows already trained
    on, the row count of each file read to its end and the rows decoding found unusable."""

    def __init__(self) -> None:
        self._counts: Counter = Counter()
        self._examples: list[dict[str, str]] = []
        self._epoch = 0
        self._files = ""
        self._plan: dict[int, object] = {}
        self._file_rows: dict[int, int] = {}
        self._unusable: dict[int, set[int]] = {}

    def add(self, counts: dict[str, int], examples: Optional[list[dict[str, str]]] = None,
            unusable: Optional[list[int]] = None) -> None:
        self._counts.update(counts)
        if examples:
            self._examples.extend(examples[: MAX_EXAMPLES - len(self._examples)])
        for sample in unusable or ():
            self._unusable.setdefault(sample >> ROW_BITS, set()).add(sample & ROW_MASK)

    def set_files(self, digest: str) -> None:
        self._files = digest

    def files(self) -> str:
        """The `files_digest` of the training read's files ("" when the training data has no sample ids)."""
        return self._files

    def begin_epoch(self, epoch: int, plan: dict[int, object]) -> None:
        """Every worker calls this, with the same values, before it reads `epoch`; `plan` is `skip_plan`'s."""
        self._epoch, self._plan = epoch, plan

    def epoch(self) -> int:
        return self._epoch

    def plan_for(self, file_index: int):
        return self._plan.get(file_index)

    def file_read(self, file_index: int, rows: int) -> None:
        self._file_rows[file_index] = rows

    def settled(self) -> tuple[dict[int, int], dict[int, list[int]]]:
        """(rows of each file read to its end, unusable rows of each file)."""
        return dict(self._file_rows), {f: sorted(rows) for f, rows in self._unusable.items()}

    def get(self) -> dict[str, int]:
        return dict(self._counts)

    def examples(self) -> list[dict[str, str]]:
        return list(self._examples)


def create_counter() -> "ray.actor.ActorHandle":
    """On the driver's node: losing a worker node (a spot instance taken back) must not take the run's counts and
    epoch record with it, as the job itself ends only with the driver."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return DataCounter.options(scheduling_strategy=here).remote()


def report_counts(counter: Optional["ray.actor.ActorHandle"], counts: dict[str, int],
                  examples: Optional[list[dict[str, str]]] = None, unusable: Optional[list[int]] = None) -> None:
    """Waits for the actor (one round trip per preprocessing batch), so counts are complete once a batch is out.
    `unusable`: the sample ids of the rows dropped (training reads)."""
    if counter is not None and counts:
        ray.get(counter.add.remote(dict(counts), examples[:MAX_EXAMPLES] if examples else None, unusable or None))


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
