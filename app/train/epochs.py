"""The training loop's side of an exact mid-epoch resume (`app.data.progress`): what an epoch's read leaves out
when it begins, and the record of the epoch that each checkpoint keeps."""

from __future__ import annotations

from typing import Optional

import ray
import torch

from app.data.progress import EpochProgress, skip_plan
from app.train import dist


def begin_epoch(stage: str, state, counter, rank: int, say) -> tuple[Optional[EpochProgress], int]:
    """Tell the run's data actor which epoch begins and what of it was trained on before a resume (every rank
    does, with the same values, before it reads). Returns the epoch's progress (None: the training data has
    no sample ids) and the batches to skip after decoding, the fallback for data without sample ids (text
    corpora, feature caches): those are read and decoded again, and, as Ray Data's split and the files read in
    parallel do not keep an order, are not exactly the ones trained on."""
    record = state.consumed if state.batches_in_epoch else None
    if counter is None:
        return None, state.batches_in_epoch
    digest = ray.get(counter.files.remote())
    usable = bool(digest) and record is not None and record.get("files") == digest
    if record is not None and not usable and rank == 0:
        say(f"[{stage}] the checkpoint's record of epoch {state.epoch} names other training files than this "
            f"run reads: the {state.batches_in_epoch} batches of it already trained on are read and skipped instead")
    ray.get(counter.begin_epoch.remote(state.epoch, skip_plan(record) if usable else {}))
    if not digest:
        return None, state.batches_in_epoch
    if not usable:
        return EpochProgress(digest), state.batches_in_epoch
    if rank == 0:
        say(f"[{stage}] epoch {state.epoch}: the {record.get('samples', 0)} samples already trained on are not "
            f"read again ({len(record.get('whole', []))} whole file(s) left unopened)")
        return EpochProgress.from_record(record), 0
    return EpochProgress(digest), 0  # rank 0 carries what was trained on before the resume


def epoch_record(seen: EpochProgress, counter) -> Optional[dict]:
    """The checkpoint's record of the epoch so far, gathered from every worker (a collective: every rank calls
    it at each checkpoint)."""
    seen.compact()
    if dist.is_distributed():
        parts: list = [None] * dist.world_size()
        torch.distributed.all_gather_object(parts, seen)
        merged = EpochProgress(seen.digest)
        for part in parts:
            merged.merge(part)
        seen = merged
    file_rows, unusable = ray.get(counter.settled.remote())
    return seen.record(file_rows, unusable)
