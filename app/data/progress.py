"""What training has consumed of the current epoch, so that a mid-epoch resume is exact and cheap.

Every raw row of an image-text shard carries a `sample_id`: the shard's place in the sorted list of the
training files (high 32 bits) and the row's place in its file (low 32 bits). The training loop records the ids
of the samples it trains on (`EpochProgress`); each checkpoint stores them, per file as ranges of rows, and
names as whole the files whose every row was trained on or found unusable. On resume the loop hands that
record to the run's data actor (`app.data.stats.DataCounter.begin_epoch`) and the read skips it before
anything is decoded: a whole file is not opened, a partly consumed file is read as bytes and its consumed rows
are dropped. Rows that were read but not trained on when the run stopped (prefetched, in the shuffle buffer,
in another worker's queue) are read again. So every usable sample of an epoch is trained on once, with any
number of workers, however Ray Data's streaming split dealt the blocks, and a resume at 90% of an epoch
decodes no more than one at 10%.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional

import numpy as np

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1


def sample_id(file_index: int, row: int) -> int:
    return (file_index << ROW_BITS) | row


def files_digest(paths: Iterable[str]) -> str:
    """Names the training files a record's file indices refer to (a record of other files is not used)."""
    return hashlib.sha256("\n".join(sorted(paths)).encode("utf-8")).hexdigest()[:16]


def to_ranges(rows: np.ndarray) -> list[list[int]]:
    """Sorted, merged [start, end) ranges covering `rows` (any order, repeats allowed)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.r_[0, breaks]]
    ends = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def from_ranges(ranges: Iterable[Iterable[int]]) -> np.ndarray:
    parts = [np.arange(a, b, dtype=np.int64) for a, b in ranges]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class EpochProgress:
    """The samples of one epoch trained on so far (by this worker, or by all once `merge`d)."""

    def __init__(self, digest: str = "") -> None:
        self.digest = digest
        self.whole: set[int] = set()             # files every usable row of which was trained on
        self.rows: dict[int, list[np.ndarray]] = {}  # file -> row numbers trained on (unmerged parts)
        self.samples = 0                          # ids added, repeats included (== distinct ids when exact)

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.samples += len(ids)
        files = ids >> ROW_BITS
        for f in np.unique(files):
            self.rows.setdefault(int(f), []).append(ids[files == f] & ROW_MASK)

    def compact(self) -> None:
        self.rows = {f: [np.unique(np.concatenate(parts))] for f, parts in self.rows.items()}

    def merge(self, other: "EpochProgress") -> None:
        self.whole |= other.whole
        for f, parts in other.rows.items():
            self.rows.setdefault(f, []).extend(parts)
        self.samples += other.samples

    def distinct(self, file_rows: Optional[dict[int, int]] = None) -> int:
        """Distinct samples recorded; whole files count their rows (`file_rows`, needed when any is whole)."""
        whole = sum((file_rows or {})[f] for f in self.whole)
        return whole + sum(len(np.unique(np.concatenate(p))) for f, p in self.rows.items() if f not in self.whole)

    def record(self, file_rows: dict[int, int], unusable: dict[int, list[int]]) -> dict:
        """The JSON-able record a checkpoint keeps. `file_rows`: rows of each file read to its end;
        `unusable`: rows of each file that decoding dropped. A file whose rows are all trained on or unusable
        becomes whole."""
        whole = set(self.whole)
        rows: dict[str, list[list[int]]] = {}
        for f, parts in self.rows.items():
            if f in whole:
                continue
            trained = np.unique(np.concatenate(parts))
            settled = np.union1d(trained, np.asarray(unusable.get(f, []), dtype=np.int64))
            n = file_rows.get(f)
            if n is not None and len(settled) >= n and (not len(settled) or settled[-1] < n):
                whole.add(f)
            else:
                rows[str(f)] = to_ranges(trained)
        return {"files": self.digest, "whole": sorted(whole), "rows": rows, "samples": self.samples,
                "whole_rows": {str(f): file_rows[f] for f in sorted(whole) if f in file_rows}}

    @classmethod
    def from_record(cls, record: Optional[dict]) -> "EpochProgress":
        progress = cls((record or {}).get("files", ""))
        if record:
            progress.whole = {int(f) for f in record.get("whole", [])}
            progress.rows = {int(f): [from_ranges(r)] for f, r in record.get("rows", {}).items()}
            progress.samples = int(record.get("samples", 0))
        return progress


def skip_plan(record: Optional[dict]) -> dict[int, object]:
    """file -> "whole" or the [start, end) ranges of its rows to drop at the read (`DataCounter.begin_epoch`)."""
    if not record:
        return {}
    plan: dict[int, object] = {int(f): "whole" for f in record.get("whole", [])}
    plan.update({int(f): ranges for f, ranges in record.get("rows", {}).items()})
    return plan
