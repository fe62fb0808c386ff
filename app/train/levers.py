"""Speed and memory levers for paper-size models, each behind a config key (README, "Speed and memory on GPUs"):
the attention kernel of every transformers model (`model.attn_implementation`), activation checkpointing
of the trained BERT (`model.gradient_checkpointing`), `torch.compile` of the trainable modules
(`train.compile`), TF32 matmuls on Ampere or newer (`train.tf32`) and AdamW's fused kernel on CUDA
(`train.fused_adamw`, in `app.train.optim`). None changes what is computed beyond float rounding; the
frozen LLM and tower dtypes are `model.llm_dtype` / `model.vision_dtype` (bfloat16 on GPU by default)
and the trainable modules keep float32 master weights under `train.precision`'s autocast."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def transformers_models(module: torch.nn.Module) -> list[PreTrainedModel]:
    """The outermost transformers models inside `module` (a model's own submodels are its business)."""
    found: list[PreTrainedModel] = []

    def visit(node: torch.nn.Module) -> None:
        for child in node.children():
            if isinstance(child, PreTrainedModel):
                found.append(child)
            else:
                visit(child)

    if isinstance(module, PreTrainedModel):
        return [module]
    visit(module)
    return found


def set_attention(model: torch.nn.Module, implementation: str) -> int:
    """Every transformers model in `model` uses `implementation` ('sdpa' or 'eager'); returns how many."""
    models = transformers_models(model)
    for inner in models:
        inner.set_attn_implementation(implementation)
    return len(models)


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Activation checkpointing of the transformers models inside the composite's trainable modules (the
    Q-Former's BERT in stages 1-2, the P-Former's in stage 0); non-reentrant, so it works under DDP and with
    inputs that need no gradient. Returns how many models it was enabled on."""
    count = 0
    for name in model.trainable_names:
        for inner in transformers_models(getattr(model, name)):
            if inner.supports_gradient_checkpointing:
                kwargs = {"use_reentrant": False}
                if hasattr(inner, "activation_checkpointing_enable"):  # the newer transformers 5.x name
                    inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                else:
                    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
                count += 1
    return count


def compile_trainable(model: torch.nn.Module) -> None:
    """`torch.compile` each trainable module in place (`nn.Module.compile`): its state_dict keys, and so the
    checkpoints, stay as they are."""
    for name in model.trainable_names:
        getattr(model, name).compile()


def enable_tf32(device: torch.device) -> bool:
    """TF32 for float32 matmuls and convolutions on a CUDA device of compute capability 8.0 or newer."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def apply_levers(model: torch.nn.Module, cfg, device: torch.device) -> list[str]:
    """The model and device levers the config asks for (before DDP wraps the trainable modules); returns what
    was applied, for the job's output."""
    applied = []
    if set_attention(model, cfg.model.attn_implementation):
        applied.append(f"attention={cfg.model.attn_implementation}")
    if cfg.model.gradient_checkpointing:
        if not enable_gradient_checkpointing(model):
            raise ValueError("model.gradient_checkpointing: no trainable transformers model supports it")
        applied.append("gradient_checkpointing")
    if cfg.train.tf32 and enable_tf32(device):
        applied.append("tf32")
    if cfg.train.compile:
        compile_trainable(model)
        applied.append("compile")
    return applied
