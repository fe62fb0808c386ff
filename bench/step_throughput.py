"""Training-step throughput of stages 1 and 2 for one worker, live or from the frozen-feature cache.

    python bench/step_throughput.py --size tiny|paper --stage qformer|llm [--cached | --both] [--batch-size N]
                                    [--steps N] [--peak-tflops X]
    python bench/step_throughput.py --size paper --stage llm --grid [--batch-sizes 64 128] [--no-compile]

--grid measures live and cached, with the levers off and on, at each batch size, with one model, and ends
with a markdown table. Levers off: eager attention, plain AdamW, no TF32, no compile (the reference's
setup). On: SDPA attention in every transformers model, fused AdamW (CUDA), TF32 (Ampere+), torch.compile
of the trainable Q-Former (unless --no-compile). Plus, at the largest batch, the levers with activation
checkpointing of the Q-Former (memory, not speed). The frozen tower, P-Former and LLM are bf16 on GPU, the
Q-Former float32 under bf16 autocast, as in training.

What runs: the project's own stage models (`app.models.composites.QFormerPretrain` / `LLMPretrain`, the same
forward as training) with random weights built from configs, no download, and one AdamW step per batch
on the trainable Q-Former. Live batches carry uint8 pixels and P-Former token ids (the frozen image
encoder and P-Former run every step); cached batches carry what `jobs.cache_features` stores: image
features and the P-Former's [CLS] sentence vector (bf16 on GPU), so only the P-Former's small heads run.
Captions are 32 random tokens (as data.max_txt_len).

Sizes:
  paper  EVA ViT-g/14 as in BLIP-2 (Blip2VisionModel: width 1408, 39 layers, 16 heads, MLP 6144, 224 px,
         257 tokens), BERT-base Q-Former (12 layers, cross-attention every 2nd, 32 queries), BERT-base
         P-Former, OPT-2.7B (32 layers, width 2560, MLP 10240, vocab 50272); bf16 autocast on GPU.
  tiny   the CPU scale of the tests, with the image encoder at least as costly as the Q-Former: a
         64 px / patch 8 tower (65 tokens, width 256, MLP 1024, 8 layers), a 2-layer width-64 Q-Former with 8
         queries, a 2-layer width-64 P-Former and a 2-layer width-64 OPT-style LLM.

FLOPs (the MFU estimate; multiply-adds count 2). For a transformer layer of width d, MLP width f, on n
tokens attending to m keys: 2n(4d^2 + 2df) + 4nmd (projections, MLP, QK^T and AV). Per sample:
  image encoder (frozen, forward only): L_v layers on N_v tokens attending to N_v;
  P-Former (frozen, forward only, live only): L_p layers on the caption (T_c tokens); cached: its heads,
    2(d_p * Q d_p + Q d_p^2 + Q d_p D) for cls_proj, pooler and llm_proj;
  Q-Former (trained: forward + backward = 3x forward): self-attention layers as above on the queries
    (and on text where a pass has text), plus in every cross-attention layer 2Qd^2 (query projection)
    + 4 N_v d_v d (key and value projections of the image tokens) + 2Qd^2 (output) + 4 Q N_v d;
    stage 1 runs four passes: queries alone (ITC image side), text alone (ITC text side), queries + text
    with cross-attention three times (ITM positives and two negatives) and once more for ITG, whose
    LM head adds 2 T_c d (d + V_q) (transform + tied vocabulary projection);
    stage 2 runs the queries alone, + llm_proj 2QdD;
  LLM (stage 2; frozen, but the gradient flows through it to the prompt: forward + input-gradient
    backward = 2x forward): L layers on T = Q + T_c tokens + the LM head 2TDV.
MFU = achieved FLOPs/s over the device's peak dense bf16 FLOPs (--peak-tflops; known GPUs are looked
up; no MFU on CPU unless given). Prints one JSON line per measured mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, matched against the device name
# in this order (the first key found in it wins: the PCIe and NVL H100s are slower than the SXM one).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "H100": 989.0, "A100": 312.0,
                    "RTX A6000": 154.8, "A10G": 125.0, "L40S": 362.0, "L4": 121.0, "V100": 125.0}
CAPTION_TOKENS = 32


@dataclass
class Shapes:
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    image_size: int
    patch: int
    qformer_width: int
    qformer_layers: int
    qformer_heads: int
    qformer_mlp: int
    queries: int
    pformer_width: int
    pformer_layers: int
    pformer_heads: int
    pformer_mlp: int
    llm_width: int
    llm_layers: int
    llm_heads: int
    llm_mlp: int
    vocab: int
    qformer_vocab: int

    @property
    def vision_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1


SIZES = {
    "paper": Shapes(1408, 39, 16, 6144, 224, 14, 768, 12, 12, 3072, 32, 768, 12, 12, 3072, 2560, 32, 32, 10240, 50272,
                    30523),
    "tiny": Shapes(256, 8, 4, 1024, 64, 8, 64, 2, 4, 128, 8, 64, 2, 4, 128, 64, 2, 4, 256, 2000, 2000),
}


# ---------------------------------------------------------------------------------------------
# FLOPs


def layer_flops(n: int, m: int, d: int, f: int) -> float:
    return 2 * n * (4 * d * d + 2 * d * f) + 4 * n * m * d


def cross_flops(q: int, nv: int, dv: int, d: int) -> float:
    return 2 * q * d * d + 4 * nv * dv * d + 2 * q * d * d + 4 * q * nv * d


def qformer_pass(s: Shapes, text: int, queries: bool, cross: bool) -> float:
    n = text + (s.queries if queries else 0)
    total = s.qformer_layers * layer_flops(n, n, s.qformer_width, s.qformer_mlp)
    if cross:
        total += (s.qformer_layers // 2) * cross_flops(s.queries, s.vision_tokens, s.vision_width, s.qformer_width)
    return total


def flops_per_sample(s: Shapes, stage: str, cached: bool) -> dict[str, float]:
    t = CAPTION_TOKENS
    vision = 0.0 if cached else s.vision_layers * layer_flops(s.vision_tokens, s.vision_tokens, s.vision_width,
                                                                s.vision_mlp)
    heads = 2 * (s.pformer_width * s.queries * s.pformer_width + s.queries * s.pformer_width ** 2
                 + s.queries * s.pformer_width * s.llm_width)
    pformer = heads + (0.0 if cached else s.pformer_layers * layer_flops(t, t, s.pformer_width, s.pformer_mlp))
    if stage == "qformer":
        itg_head = 2 * t * s.qformer_width * (s.qformer_width + s.qformer_vocab)  # lm_transform + tied LM head
        forward = (qformer_pass(s, 0, True, True) + qformer_pass(s, t, False, False)
                   + 4 * qformer_pass(s, t, True, True) + itg_head)
        return {"vision": vision, "pformer": pformer, "qformer": 3 * forward, "llm": 0.0}
    forward = qformer_pass(s, 0, True, True) + 2 * s.queries * s.qformer_width * s.llm_width
    tokens = s.queries + t
    llm = s.llm_layers * layer_flops(tokens, tokens, s.llm_width, s.llm_mlp) + 2 * tokens * s.llm_width * s.vocab
    return {"vision": vision, "pformer": pformer, "qformer": 3 * forward, "llm": 2 * llm}


# ---------------------------------------------------------------------------------------------
# models


def build(s: Shapes, stage: str, device: torch.device, dtype: torch.dtype):
    from transformers import (BertConfig, BertModel, Blip2QFormerConfig, Blip2VisionConfig, Blip2VisionModel,
                              OPTConfig, OPTForCausalLM)

    from app.models.composites import LLMPretrain, QFormerPretrain, Stage1Weights, Stage2Weights
    from app.models.llm import FrozenLLM
    from app.models.pformer import PFormer
    from app.models.qformer import QFormer
    from app.models.vision import DEFAULT_MEAN, DEFAULT_STD, VisionEncoder

    with torch.device(device):
        tower = Blip2VisionModel(Blip2VisionConfig(
            hidden_size=s.vision_width, num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
            intermediate_size=s.vision_mlp, image_size=s.image_size, patch_size=s.patch, initializer_range=0.02))
        vision = VisionEncoder(tower.to(dtype), DEFAULT_MEAN, DEFAULT_STD)
        qformer = QFormer(Blip2QFormerConfig(
            vocab_size=s.qformer_vocab, hidden_size=s.qformer_width, num_hidden_layers=s.qformer_layers,
            num_attention_heads=s.qformer_heads, intermediate_size=s.qformer_mlp, cross_attention_frequency=2,
            encoder_hidden_size=s.vision_width, use_qformer_text_input=True),
            num_query_tokens=s.queries, llm_dim=s.llm_width, bos_token_id=s.qformer_vocab - 1)
        bert = BertModel(BertConfig(vocab_size=s.qformer_vocab - 1, hidden_size=s.pformer_width, num_hidden_layers=s.pformer_layers,
                                    num_attention_heads=s.pformer_heads, intermediate_size=s.pformer_mlp),
                         add_pooling_layer=False)
        pformer = PFormer(bert, s.queries, s.llm_width).to(dtype)
        if stage == "qformer":
            return QFormerPretrain(vision, qformer, pformer, Stage1Weights())
        llm = FrozenLLM(OPTForCausalLM(OPTConfig(
            vocab_size=s.vocab, hidden_size=s.llm_width, num_hidden_layers=s.llm_layers, ffn_dim=s.llm_mlp,
            num_attention_heads=s.llm_heads, max_position_embeddings=2048, word_embed_proj_dim=s.llm_width)).to(dtype))
        return LLMPretrain(vision, qformer, llm, pformer, Stage2Weights())


def batch(s: Shapes, stage: str, size: int, cached: bool, device: torch.device, dtype: torch.dtype,
          generator: torch.Generator) -> dict[str, torch.Tensor]:
    t = CAPTION_TOKENS
    ones = torch.ones(size, t, dtype=torch.long, device=device)
    out: dict[str, torch.Tensor] = {}
    if cached:
        out["image_embeds"] = torch.randn(size, s.vision_tokens, s.vision_width, generator=generator).to(device, dtype)
        out["pformer_sentence"] = torch.randn(size, s.pformer_width, generator=generator).to(device, dtype)
    else:
        out["pixels"] = torch.randint(0, 256, (size, s.image_size, s.image_size, 3), generator=generator,
                                      dtype=torch.uint8).to(device)
        out["pformer_ids"] = torch.randint(10, min(s.qformer_vocab, 30000) - 10, (size, t), generator=generator).to(device)
        out["pformer_mask"] = ones
    if stage == "qformer":
        out["qformer_ids"] = torch.randint(10, s.qformer_vocab - 10, (size, t), generator=generator).to(device)
        out["qformer_mask"] = ones
    else:
        out["llm_ids"] = torch.randint(10, s.vocab - 10, (size, t), generator=generator).to(device)
        out["llm_mask"] = ones
    return out


@dataclass(frozen=True)
class Levers:
    attention: str = "sdpa"
    fused: bool = False
    tf32: bool = False
    compile: bool = False
    checkpointing: bool = False

    @property
    def name(self) -> str:
        on = [k for k in ("fused", "tf32", "compile", "checkpointing") if getattr(self, k)]
        return "+".join([self.attention] + on)


OFF = Levers(attention="eager")


def set_levers(model, levers: Levers, device: torch.device) -> None:
    """Apply `levers` to a built model (the project's own functions, as the training loop applies them)."""
    from app.train.levers import enable_gradient_checkpointing, set_attention

    set_attention(model, levers.attention)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = levers.tf32
        torch.backends.cudnn.allow_tf32 = levers.tf32
    bert = model.qformer.bert
    if levers.checkpointing:
        enable_gradient_checkpointing(model)
    elif getattr(bert, "is_gradient_checkpointing", False) or any(
            getattr(layer, "gradient_checkpointing", False) for layer in bert.encoder.layer):
        bert.gradient_checkpointing_disable()
    if not hasattr(model, "_plain_qformer"):
        model._plain_qformer = model.qformer
    model.qformer = torch.compile(model._plain_qformer) if levers.compile else model._plain_qformer


def measure(s: Shapes, stage: str, cached: bool, size: int, steps: int, warmup: int, device: torch.device,
            dtype: torch.dtype, model=None, levers: Levers = Levers()) -> tuple[dict, object]:
    from app.losses import stage_losses

    model = model or build(s, stage, device, dtype)
    set_levers(model, levers, device)
    model.train()
    params = list(model.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=levers.fused and device.type == "cuda" or None)
    generator = torch.Generator().manual_seed(0)
    batches = [batch(s, stage, size, cached, device, dtype, generator) for _ in range(2)]
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elapsed = 0.0
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            losses = stage_losses(model, batches[step % 2])
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            elapsed += time.perf_counter() - start
    rate = steps * size / elapsed
    flops = flops_per_sample(s, stage, cached)
    result = {"samples_per_s": round(rate, 2), "tokens_per_s": round(rate * CAPTION_TOKENS, 1),
              "step_s": round(elapsed / steps, 4), "flops_per_sample": sum(flops.values()),
              "flops_share": {k: round(v / sum(flops.values()), 3) for k, v in flops.items()},
              "achieved_tflops": round(rate * sum(flops.values()) / 1e12, 3),
              "peak_memory_gib": round((torch.cuda.max_memory_allocated() if cuda else
                                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, 2),
              "levers": levers.name}
    del optimizer
    for param in params:
        param.grad = None
    return result, model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--stage", choices=("qformer", "llm"), default="llm")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cached", action="store_true", help="batches from the feature cache (no encoder forwards)")
    mode.add_argument("--both", action="store_true", help="live, then cached, with the same model; prints the ratio")
    parser.add_argument("--batch-size", type=int, help="default: 64 (paper) / 32 (tiny)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default: looked up)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--grid", action="store_true", help="live/cached x levers off/on x --batch-sizes; a table")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128], help="--grid's batch sizes")
    parser.add_argument("--no-compile", action="store_true", help="--grid: the levers without torch.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SIZES[args.size]
    size = args.batch_size or (64 if args.size == "paper" else 32)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if args.grid:
        return grid(args, shapes, device, dtype, name, peak)
    modes = [False, True] if args.both else [args.cached]
    model, rates = None, {}
    for cached in modes:
        result, model = measure(shapes, args.stage, cached, size, args.steps, args.warmup, device, dtype, model)
        rates[cached] = result["samples_per_s"]
        result.update({"bench": "step_throughput", "size": args.size, "stage": args.stage,
                       "mode": "cached" if cached else "live", "batch_size": size, "device": name,
                       "dtype": str(dtype).removeprefix("torch."),
                       "mfu": round(result["achieved_tflops"] / peak, 4) if peak else None,
                       "torch": torch.__version__})
        print(json.dumps(result), flush=True)
    if args.both:
        live = flops_per_sample(shapes, args.stage, False)
        print(json.dumps({"bench": "step_throughput", "size": args.size, "stage": args.stage,
                          "cached_over_live": round(rates[True] / rates[False], 3),
                          "encoder_flops_share_live": round((live["vision"] + live["pformer"]) / sum(live.values()), 3),
                          "speed_up_if_encoders_were_free": round(sum(live.values()) / sum(
                              flops_per_sample(shapes, args.stage, True).values()), 3)}), flush=True)
    return 0


def grid(args, shapes: Shapes, device: torch.device, dtype: torch.dtype, name: str, peak) -> int:
    """Every combination with one model (built once), one JSON line each, then a markdown table."""
    on = Levers(fused=True, tf32=True, compile=not args.no_compile)
    plan = [(b, cached, levers) for b in args.batch_sizes for levers in (OFF, on) for cached in (False, True)]
    plan.append((max(args.batch_sizes), False, Levers(**{**on.__dict__, "checkpointing": True})))
    model, rows = None, []
    for size, cached, levers in plan:
        try:
            result, model = measure(shapes, args.stage, cached, size, args.steps, args.warmup, device, dtype, model,
                                    levers)
        except torch.OutOfMemoryError:
            result = {"samples_per_s": None, "error": "out of memory", "levers": levers.name}
            torch.cuda.empty_cache()
        result.update({"bench": "step_throughput", "size": args.size, "stage": args.stage, "batch_size": size,
                       "mode": "cached" if cached else "live", "device": name,
                       "mfu": round(result["achieved_tflops"] / peak, 4) if peak and "achieved_tflops" in result
                       else None, "torch": torch.__version__})
        print(json.dumps(result), flush=True)
        rows.append(result)
    print(f"\n{args.stage} ({args.size}) on {name}, peak {peak} TFLOP/s dense bf16, {args.steps} timed steps\n")
    print("| batch | mode | levers | samples/s | step s | peak GiB | TFLOP/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        print(f"| {r['batch_size']} | {r['mode']} | {r['levers']} | {r['samples_per_s'] or r.get('error')} | "
              f"{r.get('step_s', '-')} | {r.get('peak_memory_gib', '-')} | {r.get('achieved_tflops', '-')} | {mfu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
