"""P-Former + frozen LLM on tiny models: what is frozen stays frozen, what trains learns, checkpoints are strict."""

import numpy as np
import pytest
import torch

from app.models.tiny import tiny_config
from app.data.text import preprocess_text_batch
from app.data.captions import trim_padding
from app.stages import PFormerStage
from app.train.checkpoint import (CheckpointError, TrainerState, load_submodule, load_trainable, load_training_state,
                                  save_checkpoint)
from app.train.optim import build_optimizer, build_scheduler, lr_at
from app.losses import stage_losses

CAPTIONS = ["A man riding a horse on a beach.", "Two dogs play with a red ball.", "dog",
            "A plate of food with broccoli and rice.", "A bus parked next to a tall building."] * 4


def _batch(models, kind, captions=CAPTIONS):
    raw = {"text": np.array(captions, dtype=object), "problem": np.array([None] * len(captions), dtype=object)}
    out = preprocess_text_batch(raw, pformer_tokenizer=models["bert"], llm_tokenizer=models[kind],
                                llm_is_encoder_decoder=kind == "t5", max_chars=200, max_txt_len=16, seed=0)
    return trim_padding({k: torch.from_numpy(v).long() for k, v in out.items()})


def _model(models, kind, **loss):
    cfg = tiny_config(model={"pformer": models["bert"], "llm": models[kind]}, loss=loss)
    return cfg, PFormerStage().build_model(cfg)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_frozen_llm_gets_no_gradient_and_keeps_weights_while_pformer_learns(tiny_models, kind):
    torch.manual_seed(0)
    cfg, model = _model(tiny_models, kind, contrastive_views=2)
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    pformer_before = {k: v.clone() for k, v in model.pformer.state_dict().items()}
    model.train()
    # Frozen = no gradient; in train mode, as the reference leaves it (model.llm_dropout_in_training).
    assert model.llm.model.training and model.pformer.training
    assert all(not p.requires_grad for p in model.llm.parameters())
    optimizer = build_optimizer(model.trainable_parameters(), 1e-3, 0.05, (0.9, 0.999))
    batch = _batch(tiny_models, kind)
    losses = []
    for _ in range(60):
        out = stage_losses(model, batch)
        out["loss"].backward()
        assert all(p.grad is None for p in model.llm.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out["lm_loss"].item())
    expected = {"lm_loss", "contrastive_loss", "loss"} | ({"vocab_loss"} if kind == "opt" else set())
    assert set(out) == expected
    assert all(torch.equal(v, llm_before[k]) for k, v in model.llm.state_dict().items())
    changed = [k for k, v in model.pformer.state_dict().items() if not torch.equal(v, pformer_before[k])]
    assert any(k.startswith("bert.") for k in changed) and "cls_proj.weight" in changed and "temp" in changed
    # memorising one batch: the prompt carries the caption
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.25


def test_t5_one_word_captions_do_not_crash(tiny_models):
    _, model = _model(tiny_models, "t5")
    batch = _batch(tiny_models, "t5", ["dog", "cat", "a", "bird"])
    assert torch.isfinite(stage_losses(model, batch)["lm_loss"])


def test_masking_only_for_decoder_only_and_only_in_training(tiny_models):
    torch.manual_seed(0)
    _, opt_model = _model(tiny_models, "opt")
    ids = _batch(tiny_models, "opt")["pformer_ids"]
    opt_model.train()
    assert (opt_model._pformer_inputs(ids) == opt_model.mask_token_id).any()
    opt_model.eval()
    assert torch.equal(opt_model._pformer_inputs(ids), ids)
    _, t5_model = _model(tiny_models, "t5")
    t5_model.train()
    assert torch.equal(t5_model._pformer_inputs(ids), ids)


def test_zero_weights_skip_terms(tiny_models):
    _, model = _model(tiny_models, "opt", contrastive_weight=0.0, vocab_weight=0.0)
    out = stage_losses(model, _batch(tiny_models, "opt"))
    assert set(out) == {"lm_loss", "loss"} and out["loss"].item() == pytest.approx(out["lm_loss"].item())
    # unused heads are frozen, so DDP never waits for a gradient that cannot come
    assert not model.pformer.text_proj.weight.requires_grad and not model.pformer.temp.requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_checkpoint_round_trip_and_strict_mismatch(tiny_models, tmp_path):
    cfg, model = _model(tiny_models, "opt")
    optimizer = build_optimizer(model.trainable_parameters(), 1e-3, 0.05, (0.9, 0.999))
    scheduler = build_scheduler(optimizer, cfg.train)
    with torch.no_grad():
        model.pformer.cls_proj.weight.add_(1.0)
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    state=TrainerState(step=7), config_yaml=cfg.to_yaml(), manifest={"stage": "pformer"})
    PFormerStage().save_extras(model, tmp_path, cfg)
    _, fresh = _model(tiny_models, "opt")
    load_trainable(fresh, tmp_path)
    assert torch.equal(fresh.pformer.cls_proj.weight, model.pformer.cls_proj.weight)
    # The architecture saved beside the weights rebuilds the P-Former without its original path.
    from app.models.pformer import PFormer

    rebuilt = PFormer.from_architecture(tmp_path / "pformer")
    load_submodule(rebuilt, tmp_path, "pformer")
    assert torch.equal(rebuilt.llm_proj.weight, model.pformer.llm_proj.weight)
    # A P-Former with another prompt count does not silently load.
    cfg8 = tiny_config(model={"pformer": tiny_models["bert"], "llm": tiny_models["opt"], "num_query_tokens": 8})
    other = PFormerStage().build_model(cfg8)
    with pytest.raises(CheckpointError, match="cls_proj"):
        load_trainable(other, tmp_path)
    with pytest.raises(CheckpointError, match="no weights for 'qformer'"):
        load_submodule(model.pformer, tmp_path, "qformer")


class _OpensAFile:
    """Unpickling this calls open(path, "w"): what a crafted optimizer.pt in a shared bucket could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_training_state_loads_only_plain_values_and_refuses_a_pickle_that_runs_code(tiny_models, tmp_path):
    cfg, model = _model(tiny_models, "opt")
    optimizer = build_optimizer(model.trainable_parameters(), 1e-3, 0.05, (0.9, 0.999))
    scheduler = build_scheduler(optimizer, cfg.train)
    stage_losses(model, _batch(tiny_models, "opt"))["loss"].backward()
    optimizer.step()
    scheduler.step()
    save_checkpoint(tmp_path / "good", model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    state=TrainerState(step=1, epoch=0, batches_in_epoch=1), config_yaml=cfg.to_yaml(),
                    manifest={"stage": "pformer"})
    fresh = build_optimizer(model.trainable_parameters(), 1e-3, 0.05, (0.9, 0.999))
    fresh_scheduler = build_scheduler(fresh, cfg.train)
    state = load_training_state(tmp_path / "good", fresh, fresh_scheduler, None)
    assert state == TrainerState(step=1, epoch=0, batches_in_epoch=1) and fresh_scheduler.last_epoch == 1
    exp_avg = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(exp_avg, fresh.state_dict()["state"].values()))

    marker = tmp_path / "code-ran"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "trainer_state.json").write_text((tmp_path / "good" / "trainer_state.json").read_text())
    torch.save({"optimizer": _OpensAFile(marker), "scheduler": {}, "scaler": None}, bad / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer.pt holds more than tensors and plain values \(it refers to "
                                              r"\S*open\); it is not loaded"):
        load_training_state(bad, fresh, fresh_scheduler, None)
    assert not marker.exists()
    torch.load(bad / "optimizer.pt", weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()


def test_weight_decay_only_on_matrices_and_schedule_shape(tiny_models):
    cfg, model = _model(tiny_models, "opt")
    optimizer = build_optimizer(model.trainable_parameters(), 1e-4, 0.05, (0.9, 0.999))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])
    kw = dict(lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=100, max_steps=1100)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(50, **kw) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert lr_at(100, **kw) == pytest.approx(1e-4)
    assert lr_at(600, **kw) == pytest.approx(1e-5 + 0.5 * (1e-4 - 1e-5))
    assert lr_at(1100, **kw) == pytest.approx(1e-5) and lr_at(5000, **kw) == pytest.approx(1e-5)
