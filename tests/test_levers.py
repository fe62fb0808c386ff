"""Gradient accumulation and the speed/memory levers, on tiny models on CPU: each changes how the step is
computed, never what it computes (beyond float rounding), and the frozen parts get no optimiser state."""

from __future__ import annotations

import pytest
import torch

from app.config import ConfigError, build_config
from app.train.levers import compile_trainable, enable_gradient_checkpointing, set_attention, transformers_models
from app.train.optim import build_optimizer
from app.train.step import Stepper
from app.losses import stage_losses
from tests.helpers import tiny_fidelity as tiny


def _constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for name in model.trainable_names
            for n, p in getattr(model, name).named_parameters() if p.requires_grad}


def _halves(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    size = next(iter(batch.values())).shape[0] // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def _sgd_update(model, micro_batches, accum: int) -> dict[str, torch.Tensor]:
    """Parameters after one update by SGD (its step is proportional to the gradient, unlike AdamW's first
    step, which is about lr * sign(g) and would hide a gradient scaled wrongly)."""
    optimizer = torch.optim.SGD(list(model.trainable_parameters()), lr=0.5)
    stepper = Stepper(model, stage_losses, optimizer, _constant(optimizer), accum_steps=accum)
    results = [stepper.micro(b)[1] for b in micro_batches]
    assert results == [False] * (accum - 1) + [True]
    return _trainable(model)


def test_two_accumulated_half_batches_give_the_update_of_one_batch():
    """Stage-2 LM + alignment (no coupling between samples; captions of equal length): accumulating 2 x B/2
    is the update of 1 x B, to 1e-5."""
    batch = tiny.batch(8, full=True)
    before = _trainable(tiny.stage2(llm_dropout=False))
    one = _sgd_update(tiny.stage2(llm_dropout=False).train(), [batch], accum=1)
    two = _sgd_update(tiny.stage2(llm_dropout=False).train(), _halves(batch, 2), accum=2)
    moved = max(float((one[n] - before[n]).abs().max()) for n in one)
    assert moved > 1e-3  # the update is not nothing
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)


def test_an_unfinished_accumulation_is_dropped_not_carried_into_the_next_update():
    model = tiny.stage2(llm_dropout=False).train()
    optimizer = torch.optim.SGD(list(model.trainable_parameters()), lr=0.5)
    stepper = Stepper(model, stage_losses, optimizer, _constant(optimizer), accum_steps=3)
    before = _trainable(model)
    for part in _halves(tiny.batch(8, full=True), 2):
        assert stepper.micro(part)[1] is False
    assert stepper.discard() == 2
    assert all(p.grad is None for p in model.trainable_parameters())
    assert all(torch.equal(before[n], p) for n, p in _trainable(model).items())


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # two processes on the test machine's cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = tiny.stage2(llm_dropout=False).train()
        model.qformer = DistributedDataParallel(model.qformer)
        local = _halves(tiny.batch(8, full=True), world)[rank]
        optimizer = torch.optim.SGD(list(model.trainable_parameters()), lr=0.5)
        stepper = Stepper(model, stage_losses, optimizer, _constant(optimizer), accum_steps=2)
        first, second = _halves(local, 2)
        assert stepper.micro(first)[1] is False
        # No all-reduce on the first micro-batch: each worker still holds its own gradient.
        grad = torch.cat([p.grad.flatten() for p in model.trainable_parameters() if p.grad is not None])
        parts = [torch.empty_like(grad) for _ in range(world)]
        dist.all_gather(parts, grad)
        differ = not torch.allclose(parts[0], parts[1])
        assert stepper.micro(second)[1] is True
        if rank == 0:
            torch.save({"differ_after_first": differ,
                        "params": {n: p.detach().clone() for n, p in model.qformer.module.named_parameters()
                                   if p.requires_grad}}, out)
        del stepper, optimizer, model  # DDP's reducer goes before its process group
        dist.barrier()  # both ranks are done with every collective before either tears the group down
    finally:
        dist.destroy_process_group()


def test_ddp_skips_the_all_reduce_until_the_last_micro_batch_and_matches_one_process(tmp_path):
    """2 gloo workers x 2 micro-batches of B/4 under DDP (no_sync on the first) == 1 process on B."""
    import torch.multiprocessing as mp

    out = tmp_path / "ddp.pt"
    context = mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=False)
    for _ in range(60):  # a hang guard (a collective waiting for a worker that died), not a speed limit
        if context.join(timeout=5):
            break
    else:
        codes = [process.exitcode for process in context.processes]
        for process in context.processes:
            process.kill()
        pytest.fail(f"the two gloo workers did not finish in 5 minutes (exit codes {codes})")
    result = torch.load(out)
    assert result["differ_after_first"]
    one = _sgd_update(tiny.stage2(llm_dropout=False).train(), [tiny.batch(8, full=True)], accum=1)
    one = {n.removeprefix("qformer."): v for n, v in one.items()}
    assert set(one) == set(result["params"])
    for name, value in one.items():
        torch.testing.assert_close(result["params"][name], value, atol=1e-5, rtol=0, msg=name)


def test_grad_accum_steps_is_validated():
    assert build_config(overrides=["train.grad_accum_steps=4"]).train.grad_accum_steps == 4
    with pytest.raises(ConfigError, match="train.grad_accum_steps"):
        build_config(overrides=["train.grad_accum_steps=0"])
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        build_config(overrides=["model.attn_implementation=flash"])


# ---------------------------------------------------------------------------------------------
# levers


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_optimizer_state_covers_the_trainable_parameters_only(stage):
    model = getattr(tiny, stage)().train()
    trainable = list(model.trainable_parameters())
    optimizer = build_optimizer(trainable, 1e-4, 0.05, (0.9, 0.999))
    stage_losses(model, tiny.batch(4))["loss"].backward()
    optimizer.step()
    state_numel = sum(s["exp_avg"].numel() for s in optimizer.state.values())
    assert state_numel == sum(p.numel() for p in trainable)
    frozen = [p for name in model.frozen_names if getattr(model, name, None) is not None
              for p in getattr(model, name).parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None and p not in optimizer.state for p in frozen)
    assert sum(p.numel() for p in model.parameters()) > state_numel


def test_fused_adamw_takes_the_same_steps():
    batch = tiny.batch(6, full=True)
    after = {}
    for fused in (False, True):
        model = tiny.stage2(llm_dropout=False).train()
        optimizer = build_optimizer(model.trainable_parameters(), 1e-3, 0.05, (0.9, 0.999), fused=fused)
        assert bool(optimizer.defaults.get("fused")) is fused
        for _ in range(3):
            stage_losses(model, batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        after[fused] = _trainable(model)
    for name, value in after[False].items():
        # An attention key bias has a gradient of exactly zero in exact arithmetic (softmax ignores a shift of
        # every score by the same amount): its float gradient is rounding noise, which AdamW normalises to
        # steps of about lr whatever the kernel, so the kernels may disagree there by a fraction of lr.
        atol = 3e-5 if name.endswith("key.bias") else 1e-6
        torch.testing.assert_close(after[True][name], value, atol=atol, rtol=1e-5, msg=name)


def _losses_and_grads(model, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    losses = stage_losses(model, batch)
    losses["loss"].backward()
    return ({k: float(v.detach()) for k, v in losses.items()},
            {n: p.grad.clone() for n, p in model.qformer.named_parameters() if p.grad is not None})


def _assert_same(a, b, atol, grad_tol=None):
    """Losses to `atol` (or 1e-5 relative); the gradients as one vector to `grad_tol` (default `atol`) relative."""
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for key in a[0]:
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-5, abs=atol), key
    # Compared as one vector: an untrained model's gradients are sums of large, nearly cancelling terms, so
    # float32 rounding moves single small entries (as in test_fidelity's gloo comparison).
    one = torch.cat([a[1][n].flatten() for n in sorted(a[1])])
    two = torch.cat([b[1][n].flatten() for n in sorted(a[1])])
    assert float((one - two).norm() / one.norm()) < (grad_tol or atol)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_eager_and_sdpa_attention_compute_the_same_losses_and_gradients(stage):
    """Every transformers model inside (tower, Q-Former, P-Former, LLM) switches kernel; the 4-D boolean ITG
    mask and the padding masks mean the same to both."""
    batch = tiny.batch(6)  # captions of different lengths: padding masked
    results = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = getattr(tiny, stage)(**({"llm_dropout": False} if stage == "stage2" else {})).train()
        assert set_attention(model, implementation) == (4 if stage == "stage2" else 3)
        assert {m.config._attn_implementation for m in transformers_models(model)} == {implementation}
        torch.manual_seed(0)  # the same ITM negatives
        results[implementation] = _losses_and_grads(model, batch)
    # (the two kernels sum in other orders: the stage-1 gradients agree to ~2e-4 relative, the losses to 1e-5)
    _assert_same(results["eager"], results["sdpa"], atol=1e-5, grad_tol=1e-3)


def test_gradient_checkpointing_recomputes_the_qformer_with_the_same_gradients():
    batch = tiny.batch(6)
    results, calls = {}, {}
    for checkpointing in (False, True):
        model = tiny.stage1().train()
        if checkpointing:
            assert enable_gradient_checkpointing(model) == 1
        seen = calls[checkpointing] = []
        model.qformer.bert.encoder.layer[0].attention.register_forward_hook(lambda *_: seen.append(1))
        torch.manual_seed(0)
        results[checkpointing] = _losses_and_grads(model, batch)
    # Checkpointed, every pass through the layer runs again in the backward pass to rebuild its activations.
    assert len(calls[False]) > 0 and len(calls[True]) == 2 * len(calls[False])
    _assert_same(results[False], results[True], atol=1e-6)


def test_compiled_trainable_module_keeps_its_checkpoint_keys_and_trains_the_same():
    batch = tiny.batch(4, full=True)
    plain = tiny.stage2(llm_dropout=False).train()
    compiled = tiny.stage2(llm_dropout=False).train()
    keys = set(compiled.qformer.state_dict())
    compile_trainable(compiled)
    assert set(compiled.qformer.state_dict()) == keys  # checkpoints load either way
    _assert_same(_losses_and_grads(plain, batch), _losses_and_grads(compiled, batch), atol=1e-5)


def test_the_config_keys_reach_the_model():
    """What the training loop applies from the config (`apply_levers`, before DDP wraps the trainable modules)."""
    from app.train.levers import apply_levers

    model = tiny.stage1().train()
    cfg = build_config(overrides=["model.attn_implementation=eager", "model.gradient_checkpointing=true",
                                  "train.compile=true"])
    assert apply_levers(model, cfg, torch.device("cpu")) == ["attention=eager", "gradient_checkpointing", "compile"]
    assert {m.config._attn_implementation for m in transformers_models(model)} == {"eager"}
    assert all(layer.gradient_checkpointing for layer in model.qformer.bert.encoder.layer)
    assert model.qformer._compiled_call_impl is not None  # compiled in place: the frozen parts are not
    assert model.vision._compiled_call_impl is None
    defaults = build_config()
    assert apply_levers(tiny.stage1(), defaults, torch.device("cpu")) == ["attention=sdpa"]  # tf32: CUDA only
