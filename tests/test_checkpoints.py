"""Checkpoint integrity: every file is in the manifest with its size and SHA-256; an incomplete or damaged
checkpoint is never loaded, and a run folder's newest complete one is used instead."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch

from app.train.checkpoint import (MANIFEST_FILE, OPTIMIZER_FILE, WEIGHTS_FILE, CheckpointError, IncompleteCheckpoint,
                                  TrainerState, checkpoint_name, complete_checkpoints, find_checkpoint,
                                  local_checkpoint, save_checkpoint, storage_problem, verify_checkpoint)


class Tiny:  # what the training code needs of a model: named trainable submodules
    trainable_names = ("pformer",)

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.pformer = torch.nn.Linear(8, 4)


def write(directory, step: int = 10):
    model = Tiny(step)
    optimizer = torch.optim.AdamW(model.pformer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def extras(d):
        (d / "pformer").mkdir()
        (d / "pformer" / "config.json").write_text(json.dumps({"hidden": 8}))

    save_checkpoint(directory, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    state=TrainerState(step=step), config_yaml="stage: pformer\n", manifest={"stage": "pformer"},
                    extras=extras)
    return directory


def test_the_manifest_lists_every_file_with_its_size_and_digest(tmp_path):
    ckpt = write(tmp_path / "checkpoint_00000010")
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    assert sorted(files) == on_disk and "pformer/config.json" in files  # the stage's extras too
    for rel, entry in files.items():
        data = (ckpt / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(ckpt)["step"] == 10 and storage_problem(str(ckpt)) is None


def test_a_cut_or_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    ckpt = write(tmp_path / "checkpoint_00000010")
    weights = ckpt / WEIGHTS_FILE
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])  # cut mid-write
    with pytest.raises(IncompleteCheckpoint, match=f"model.safetensors has {size // 2} bytes, its manifest says {size}"):
        verify_checkpoint(ckpt)
    assert storage_problem(str(ckpt)) == f"model.safetensors has {size // 2} bytes, its manifest says {size}"
    with pytest.raises(IncompleteCheckpoint, match="model.safetensors has"):
        local_checkpoint(str(ckpt), "pformer")  # what init_from loads through

    ckpt = write(tmp_path / "flipped")
    data = bytearray((ckpt / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the digest tells
    (ckpt / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(IncompleteCheckpoint, match="model.safetensors does not match the SHA-256"):
        verify_checkpoint(ckpt)
    verify_checkpoint(ckpt, only=(OPTIMIZER_FILE,))  # a check limited to other files passes

    ckpt = write(tmp_path / "missing")
    (ckpt / OPTIMIZER_FILE).unlink()
    with pytest.raises(IncompleteCheckpoint, match="incomplete: optimizer.pt is missing"):
        verify_checkpoint(ckpt)
    assert storage_problem(str(ckpt)) == "optimizer.pt is missing"


def test_a_run_folder_gives_its_newest_complete_checkpoint_and_says_which_it_passed_over(tmp_path, caplog):
    run = tmp_path / "run"
    write(run / "checkpoint_00000010", 10)
    write(run / "checkpoint_00000020", 20)
    write(run / "checkpoint_00000030", 30)
    (run / "checkpoint_00000030" / WEIGHTS_FILE).write_bytes(b"")  # damaged after the fact
    cut = run / "checkpoint_00000040"  # cut before its manifest was written
    write(cut, 40)
    (cut / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="app.train.checkpoint"):
        uri, manifest = find_checkpoint(str(run), ("pformer",))
    assert uri == f"{run}/checkpoint_00000020" and manifest["step"] == 20
    assert "checkpoint_00000040: no manifest.json" in caplog.text
    assert "checkpoint_00000030: model.safetensors has 0 bytes" in caplog.text
    assert complete_checkpoints(str(run), below="checkpoint_00000020") == [f"{run}/checkpoint_00000010"]
    with pytest.raises(CheckpointError, match="checkpoint_00000030 is incomplete or damaged: model.safetensors has 0"):
        find_checkpoint(str(run / "checkpoint_00000030"), ("pformer",), key="init_from.pformer")
    for name in ("checkpoint_00000010", "checkpoint_00000020"):
        shutil.rmtree(run / name)
    with pytest.raises(CheckpointError, match="init_from.pformer: no complete checkpoint at"):
        find_checkpoint(str(run), ("pformer",), key="init_from.pformer")


def test_checkpoints_from_before_the_file_table_load_unverified(tmp_path):
    ckpt = write(tmp_path / "old")
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    del manifest["files"]
    manifest["format"] = 1
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert verify_checkpoint(ckpt)["format"] == 1 and storage_problem(str(ckpt)) is None


def test_new_checkpoints_never_take_the_name_of_one_passed_over():
    assert checkpoint_name(150, set()) == "checkpoint_00000150"
    assert checkpoint_name(150, {"checkpoint_00000150"}) == "checkpoint_00000150_1"
    assert checkpoint_name(150, {"checkpoint_00000150", "checkpoint_00000150_1"}) == "checkpoint_00000150_2"
    # sorted by name, a rewritten step still comes after the one it replaces and before the next step
    assert sorted(["checkpoint_00000160", "checkpoint_00000150_1", "checkpoint_00000150"])[1] == "checkpoint_00000150_1"
