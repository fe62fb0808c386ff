"""Checkpoint directories: what every stage writes and how it is read back, strictly.

    model.safetensors     trainable weights, keys "<submodule>.<param>" (frozen parts are not copied)
    optimizer.pt          optimiser, scheduler and grad-scaler states (tensors and plain values only: read
                          with torch.load(weights_only=True), so a crafted file cannot run code)
    trainer_state.json    step, epoch, batches consumed in that epoch and, for image-text shards, which
                          samples of it (`app.data.progress`)
    config.yaml           the resolved run config
    manifest.json         stage, trainable submodules, URIs of the frozen parts it depends on, and the size
                          and SHA-256 of every other file (written last)
    <stage extras>        e.g. pformer/ (architecture + tokenizer) so later stages need no HF id

A checkpoint is complete when every file its manifest lists is there with that size and digest: a folder
cut mid-upload or damaged afterwards is never loaded (`verify_checkpoint`); a run folder's newest complete
checkpoint is the one used (`find_checkpoint`). Checkpoints written before the file table (format 1)
load unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pyarrow.fs as pafs

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from app import storage
from app.errors import UserError

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: the manifest lists every file with its size and SHA-256
STAGE_NAMES = {"pformer": "stage 0 (P-Former)", "qformer": "stage 1 (Q-Former)", "llm": "stage 2 (Q-Former + LLM)"}


logger = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, of the wrong stage, or does not match the model."""


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint whose files are missing or differ from its manifest (cut mid-write, or damaged)."""


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already consumed (mid-epoch resume)
    consumed: Optional[dict] = None  # the samples of `epoch` trained on (`EpochProgress.record`), if numbered


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    state = {}
    for name in model.trainable_names:
        for key, value in unwrap(getattr(model, name)).state_dict().items():
            state[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    return state


def save_checkpoint(directory: str | Path, *, model, optimizer, scheduler, scaler, state: TrainerState,
                    config_yaml: str, manifest: dict[str, Any],
                    extras: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a checkpoint; `extras(directory)` adds the stage's own files. The manifest comes last and
    lists every file, so a folder without it, or whose files differ from it, is incomplete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(directory / WEIGHTS_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(asdict(state)))
    (directory / CONFIG_FILE).write_text(config_yaml)
    if extras is not None:
        extras(directory)
    full_manifest = {"format": FORMAT_VERSION, "trainable": list(model.trainable_names), "step": state.step,
                     **manifest, "files": file_table(directory)}
    (directory / MANIFEST_FILE).write_text(json.dumps(full_manifest, indent=2))
    return directory


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under `directory` but the manifest."""
    return {path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": sha256(path)}
            for path in sorted(directory.rglob("*")) if path.is_file() and path != directory / MANIFEST_FILE}


def listed_files(manifest: dict[str, Any], only: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The manifest's file table, limited to the top-level files or folders named in `only`."""
    files = manifest.get("files") or {}
    return {rel: entry for rel, entry in files.items() if not only or rel.split("/", 1)[0] in only}


def verify_checkpoint(directory: str | Path, only: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest of a local checkpoint whose files (those under the names in `only`, or all) have the
    sizes and SHA-256 digests it lists; CheckpointError naming the first that does not."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for rel, entry in listed_files(manifest, only).items():
        path = directory / rel
        if not path.is_file():
            raise IncompleteCheckpoint(f"checkpoint {directory} is incomplete: {rel} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise IncompleteCheckpoint(f"checkpoint {directory} is damaged: {rel} has {size} bytes, its manifest "
                                       f"says {entry['size']}")
        if sha256(path) != entry["sha256"]:
            raise IncompleteCheckpoint(f"checkpoint {directory} is damaged: {rel} does not match the SHA-256 in "
                                       f"its manifest")
    return manifest


def storage_problem(uri: str, s3: Optional[storage.S3Options] = None) -> Optional[str]:
    """Why the checkpoint at `uri` (any storage) is incomplete, judged by its listing against the
    manifest's sizes (cheap: no file is read but the manifest); None when it looks complete."""
    try:
        manifest = storage.read_json(storage.join(uri, MANIFEST_FILE), s3)
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}"
    except (OSError, ValueError) as err:
        return f"unreadable {MANIFEST_FILE} ({err})"
    files = listed_files(manifest)
    if not files:
        return None
    fs, root = storage.resolve(uri, s3)
    sizes = {i.path[len(root):].lstrip("/"): i.size
             for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File}
    for rel, entry in files.items():
        if rel not in sizes:
            return f"{rel} is missing"
        if sizes[rel] != entry["size"]:
            return f"{rel} has {sizes[rel]} bytes, its manifest says {entry['size']}"
    return None


def checkpoint_name(step: int, taken: set[str]) -> str:
    """checkpoint_<step>, or checkpoint_<step>_<k> when that name belongs to an incomplete checkpoint that
    Ray Train still lists (writing into it would let Ray delete the new one with the old)."""
    name = base = f"checkpoint_{step:08d}"
    k = 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def checkpoint_folders(run_uri: str, s3: Optional[storage.S3Options] = None) -> list[tuple[str, Optional[str]]]:
    """(name, what is wrong with it or None) of each checkpoint_* folder of a run, newest first."""
    names = [n for n in reversed(storage.list_names(run_uri, s3, folders=True)) if n.startswith("checkpoint_")]
    return [(name, storage_problem(storage.join(run_uri, name), s3)) for name in names]


def store_checkpoint(local_dir: str | Path, run_uri: str, name: str, s3: Optional[storage.S3Options], *, keep: int,
                     leave: set[str]) -> tuple[Any, str]:
    """What Ray Train does with a reported checkpoint, for its local mode (which keeps none): copy the folder
    written at `local_dir` to `run_uri/name`, then delete the run's oldest complete checkpoints beyond the
    newest `keep` (train.num_checkpoints_to_keep), never one named in `leave`. (filesystem, path) of the copy.
    A copy cut short fails its manifest check and is never resumed from."""
    uri = storage.join(run_uri, name)
    storage.upload_dir(local_dir, uri, s3)
    complete = [n for n, problem in checkpoint_folders(run_uri, s3) if problem is None and n not in leave]
    for old in complete[keep:]:
        fs, path = storage.resolve(storage.join(run_uri, old), s3)
        fs.delete_dir(path)
    return storage.resolve(uri, s3)


def complete_checkpoints(run_uri: str, s3: Optional[storage.S3Options] = None,
                         below: Optional[str] = None) -> list[str]:
    """URIs of the run folder's complete checkpoints, newest first (those named before `below` only);
    each incomplete one is logged with what is wrong with it."""
    complete = []
    for name, problem in checkpoint_folders(run_uri, s3):
        if below is not None and name >= below:
            continue
        if problem is None:
            complete.append(storage.join(run_uri, name))
        else:
            logger.warning("skipping incomplete checkpoint %s: %s", storage.join(run_uri, name), problem)
    return complete


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise IncompleteCheckpoint(f"{directory} is not a complete checkpoint of this project (no {MANIFEST_FILE})")
    return json.loads(path.read_text())


def load_submodule(module: torch.nn.Module, directory: str | Path, name: str) -> None:
    """Load the weights saved for submodule `name` into `module`; any mismatch is an error naming keys."""
    weights = load_file(str(Path(directory) / WEIGHTS_FILE))
    prefix = f"{name}."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint {directory} holds no weights for '{name}' "
                              f"(it has: {sorted({k.split('.')[0] for k in weights})})")
    try:
        result = unwrap(module).load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:4])
        raise CheckpointError(f"checkpoint {directory} does not match '{name}': {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {directory} does not match '{name}': "
                              f"missing keys {result.missing_keys[:10]}, unexpected keys {result.unexpected_keys[:10]}")


def load_trainable(model, directory: str | Path) -> None:
    for name in model.trainable_names:
        load_submodule(getattr(model, name), directory, name)


def load_training_state(directory: str | Path, optimizer, scheduler, scaler) -> TrainerState:
    path = Path(directory) / OPTIMIZER_FILE
    try:  # tensors, numbers, strings and containers only: unpickling cannot call anything
        states = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        refers = f" (it refers to {named.group(1)})" if named else ""
        raise CheckpointError(f"{path} holds more than tensors and plain values{refers}; it is not loaded, as "
                              f"unpickling it could run code") from None
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    if scaler is not None and states.get("scaler") is not None:
        scaler.load_state_dict(states["scaler"])
    return TrainerState(**json.loads((Path(directory) / STATE_FILE).read_text()))


def check_stage(directory: str | Path, expected: str, role: Optional[str] = None) -> dict[str, Any]:
    manifest = read_manifest(directory)
    if manifest.get("stage") != expected:
        what = f" for {role}" if role else ""
        raise CheckpointError(f"{directory} is a '{manifest.get('stage')}' checkpoint; a '{expected}' "
                              f"checkpoint is needed{what}")
    return manifest


def find_checkpoint(uri: str, stages: Sequence[str], s3: Optional[storage.S3Options] = None, *,
                    key: str = "--checkpoint", purpose: str = "this") -> tuple[str, dict[str, Any]]:
    """(checkpoint URI, manifest) for `uri`, a checkpoint (a folder holding manifest.json) or a run folder
    (`storage_path/name`: its latest checkpoint_* with a manifest), local or s3://. CheckpointError naming
    `key` when there is none, or when its stage is not one of `stages` (`purpose` says what needs it)."""
    if not storage.is_s3(uri) and not Path(uri).expanduser().exists():
        raise CheckpointError(f"{key}: no such checkpoint or run folder: {uri}")
    if not storage.exists(storage.join(uri, MANIFEST_FILE), s3):
        try:
            complete = complete_checkpoints(uri, s3)
        except OSError as err:
            raise CheckpointError(f"{key}: cannot list {uri}: {err}") from None
        if not complete:
            raise CheckpointError(f"{key}: no complete checkpoint at {uri} (expected a checkpoint folder with "
                                  f"{MANIFEST_FILE}, or a run folder with checkpoint_* folders)")
        uri = complete[0]
    else:
        problem = storage_problem(uri, s3)
        if problem:
            raise CheckpointError(f"{key}: checkpoint {uri} is incomplete or damaged: {problem}")
    manifest = storage.read_json(storage.join(uri, MANIFEST_FILE), s3)
    stage = manifest.get("stage")
    if stage not in stages:
        wanted = " or ".join(f"a {STAGE_NAMES[s]} checkpoint" for s in stages)
        raise CheckpointError(f"{key}: {uri} is a {STAGE_NAMES.get(stage, repr(stage))} checkpoint; "
                              f"{purpose} needs {wanted}")
    return uri, manifest


def local_checkpoint(uri: str, part: str, s3: Optional[storage.S3Options] = None) -> str:
    """A local folder holding a checkpoint's weights, manifest and the named extras folder (no optimiser),
    each file checked against the manifest's SHA-256."""
    directory = storage.local_model(uri, s3, only=(WEIGHTS_FILE, MANIFEST_FILE, part))
    verify_checkpoint(directory, only=(WEIGHTS_FILE, part))
    return directory
