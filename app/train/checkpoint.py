"""Checkpoint directories: what every stage writes and how it is read back, strictly.

    model.safetensors     trainable weights, keys "<submodule>.<param>" (frozen parts are not copied)
    optimizer.pt          optimiser, scheduler and grad-scaler states (tensors and plain values only: read
                          with torch.load(weights_only=True), so a crafted file cannot run code)
    trainer_state.json    step, epoch, batches consumed in that epoch
    config.yaml           the resolved run config
    manifest.json         stage, trainable submodules, URIs of the frozen parts it depends on
    <stage extras>        e.g. pformer/ (architecture + tokenizer) so later stages need no HF id
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

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
FORMAT_VERSION = 1
STAGE_NAMES = {"pformer": "stage 0 (P-Former)", "qformer": "stage 1 (Q-Former)", "llm": "stage 2 (Q-Former + LLM)"}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, of the wrong stage, or does not match the model."""


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already consumed (mid-epoch resume)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    state = {}
    for name in model.trainable_names:
        for key, value in unwrap(getattr(model, name)).state_dict().items():
            state[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    return state


def save_checkpoint(directory: str | Path, *, model, optimizer, scheduler, scaler, state: TrainerState,
                    config_yaml: str, manifest: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(directory / WEIGHTS_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(asdict(state)))
    (directory / CONFIG_FILE).write_text(config_yaml)
    full_manifest = {"format": FORMAT_VERSION, "trainable": list(model.trainable_names), "step": state.step,
                     **manifest}
    (directory / MANIFEST_FILE).write_text(json.dumps(full_manifest, indent=2))
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint of this project (no {MANIFEST_FILE})")
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
            found = storage.list_names(uri, s3, folders=True)
        except OSError as err:
            raise CheckpointError(f"{key}: cannot list {uri}: {err}") from None
        candidates = [storage.join(uri, name) for name in reversed(found) if name.startswith("checkpoint_")]
        complete = [c for c in candidates if storage.exists(storage.join(c, MANIFEST_FILE), s3)]
        if not complete:
            raise CheckpointError(f"{key}: no checkpoint at {uri} (expected a checkpoint folder with {MANIFEST_FILE}, "
                                  f"or a run folder with checkpoint_* folders)")
        uri = complete[0]
    manifest = storage.read_json(storage.join(uri, MANIFEST_FILE), s3)
    stage = manifest.get("stage")
    if stage not in stages:
        wanted = " or ".join(f"a {STAGE_NAMES[s]} checkpoint" for s in stages)
        raise CheckpointError(f"{key}: {uri} is a {STAGE_NAMES.get(stage, repr(stage))} checkpoint; "
                              f"{purpose} needs {wanted}")
    return uri, manifest


def local_checkpoint(uri: str, part: str, s3: Optional[storage.S3Options] = None) -> str:
    """A local folder holding a checkpoint's weights, manifest and the named extras folder (no optimiser)."""
    return storage.local_model(uri, s3, only=(WEIGHTS_FILE, MANIFEST_FILE, part))
