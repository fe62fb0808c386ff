"""Tiny random models and tokenizers trained on a given corpus, saved as ordinary HF folders.

Used by tests, benchmarks and the embedded demo: nothing is downloaded, and the saved folders load
through exactly the same `from_pretrained` path as `bert-base-uncased` or `facebook/opt-2.7b`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from transformers import (BertConfig, BertModel, BertTokenizerFast, OPTConfig, OPTForCausalLM,
                          PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration)

from app.config import Config, build_config

READY_FILE = "READY.json"
RECIPE_VERSION = 3  # bump when the recipe below changes, so cached folders are rebuilt


def train_bert_tokenizer(lines: list[str], vocab_size: int) -> BertTokenizerFast:
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return BertTokenizerFast(vocab=wp.get_vocab(), do_lower_case=True)


def train_llm_tokenizer(lines: list[str], vocab_size: int, kind: str) -> PreTrainedTokenizerFast:
    """OPT-style: byte-level BPE, `</s>` as BOS/EOS prepended. T5-style: unigram with `</s>` appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "</s>", "<unk>"]
    if kind == "opt":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        eos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                           special_tokens=[("</s>", eos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>", padding_side="right")
    if kind == "t5":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(lines, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                               unk_token="<unk>"))
        if tok.get_vocab_size() < vocab_size // 2:
            # The unigram trainer degenerates on corpora of very few distinct words (the demo's scene grammar:
            # 87 pieces of 500, "picture" spelled letter by letter, so a 24-token caption budget holds about six
            # words). Word pieces from BPE over the same Metaspace words keep T5's tokenization otherwise.
            tok = Tokenizer(models.BPE(unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            tok.decoder = decoders.Metaspace()
            tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
        eos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", eos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>", padding_side="right")
    raise ValueError(f"unknown tokenizer kind {kind!r} (opt or t5)")


def build_tiny_bert(vocab_size: int, hidden: int = 64, layers: int = 2) -> BertModel:
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=128)
    return BertModel(config, add_pooling_layer=False)


def build_tiny_opt(tok: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2) -> OPTForCausalLM:
    config = OPTConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, ffn_dim=hidden * 4,
                       num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return OPTForCausalLM(config)


def build_tiny_t5(tok: PreTrainedTokenizerFast, d_model: int = 64, layers: int = 2) -> T5ForConditionalGeneration:
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // 4, d_ff=d_model * 2, num_layers=layers,
                      num_decoder_layers=layers, num_heads=4, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return T5ForConditionalGeneration(config)


def pretrain_tiny_lm(model, tok, lines: list[str], steps: int, batch_size: int = 64, lr: float = 3e-3,
                     max_len: int = 32, seed: int = 0, one_cycle: bool = False) -> float:
    """A few hundred language-modelling steps on the corpus, so the frozen tiny LLM is a language model
    (a random one ignores its prompt). Decoder-only: next token on caption + newline; encoder-decoder:
    suffix from prefix (the prefix-LM objective) mixed with copying. `one_cycle`: a warm-up then annealed
    learning rate (torch's OneCycleLR peaking at `lr`) instead of a constant one. Returns the last loss."""
    import random

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = (torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(1, steps), pct_start=0.1)
                if one_cycle else None)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        texts = rng.sample(lines, min(batch_size, len(lines)))
        if model.config.is_encoder_decoder:
            # Half copying (cut 0: the whole caption in and out), half prefix -> suffix: a tiny T5 must learn to
            # read what its encoder is given, which a real pre-trained T5 does well.
            cuts = [rng.randint(1, max(1, len(t.split()) // 2)) if rng.random() < 0.5 else 0 for t in texts]
            src = tok([" ".join(t.split()[:c]) if c else t for t, c in zip(texts, cuts)], padding=True, truncation=True,
                      max_length=max_len, return_tensors="pt")
            tgt = tok([" ".join(t.split()[c:]) if c else t for t, c in zip(texts, cuts)], padding=True, truncation=True,
                      max_length=max_len, return_tensors="pt")
            labels = tgt.input_ids.masked_fill(tgt.attention_mask == 0, -100)
            loss = model(input_ids=src.input_ids, attention_mask=src.attention_mask, labels=labels).loss
        else:
            enc = tok([t + "\n" for t in texts], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def _fingerprint(lines: list[str], settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def prepare_tiny_models(out_dir: str | Path, lines: Iterable[str], *, seed: int = 0, bert_vocab: int = 2000,
                        llm_vocab: int = 2000, hidden: int = 64, layers: int = 2,
                        lm_steps: dict[str, int] | None = None, llms: tuple[str, ...] = ("opt", "t5"),
                        lm_lines: Optional[list[str]] = None, lm_max_len: int = 32,
                        llm_tokenizer_lines: Optional[list[str]] = None, lm_one_cycle: bool = False) -> dict[str, str]:
    """Write `bert/` (random) and the LLMs named in `llms`, `opt/` and/or `t5/` (briefly pre-trained on
    `lines`), under out_dir, each with its tokenizer. `lm_lines`: other text for the decoder-only LLM's
    pre-training (e.g. a caption followed by a paraphrase, so it learns to use its context the way a real
    LLM does). `llm_tokenizer_lines`: more text the LLM tokenizers are trained on besides `lines` (words the
    pre-training text has and the corpus does not, such as a question template's). Cached: a second call with
    the same corpus and settings returns at once. `lm_one_cycle`: see `pretrain_tiny_lm`."""
    out = Path(out_dir)
    lines = [line for line in lines if line.strip()]
    # The encoder-decoder needs more steps: only once it can copy does a soft prompt carry information.
    lm_steps = {"opt": 300, "t5": 1500} if lm_steps is None else lm_steps
    unknown = sorted(set(llms) - {"opt", "t5"})
    if unknown:
        raise ValueError(f"unknown tiny LLM kind(s) {unknown} (opt, t5)")
    settings = dict(recipe=RECIPE_VERSION, seed=seed, bert_vocab=bert_vocab, llm_vocab=llm_vocab, hidden=hidden, layers=layers,
                    lm_steps=lm_steps)
    if lm_lines is not None:
        settings.update(lm_max_len=lm_max_len, lm_lines=_fingerprint(lm_lines, {}))
    if llm_tokenizer_lines is not None:
        settings.update(llm_tokenizer_lines=_fingerprint(llm_tokenizer_lines, {}))
    if lm_one_cycle:
        settings.update(lm_one_cycle=True)
    fingerprint = _fingerprint(lines, settings)
    ready = out / READY_FILE
    built: list[str] = []
    if ready.exists():
        previous = json.loads(ready.read_text())
        if previous.get("fingerprint") == fingerprint:
            built = previous.get("llms", ["opt", "t5"])
    wanted = [kind for kind in ("opt", "t5") if kind in llms or kind in built]  # keep what is there already
    paths = {name: str(out / name) for name in ("bert", *wanted)}
    if set(wanted) <= set(built):
        return paths
    for name in ("bert", "opt", "t5"):  # only this function's folders: others may live next to them
        shutil.rmtree(out / name, ignore_errors=True)
    torch.manual_seed(seed)
    bert_tok = train_bert_tokenizer(lines, bert_vocab)
    bert_tok.save_pretrained(paths["bert"])
    build_tiny_bert(len(bert_tok), hidden, layers).save_pretrained(paths["bert"])
    for kind, build in (("opt", build_tiny_opt), ("t5", build_tiny_t5)):
        if kind not in wanted:
            continue
        tok = train_llm_tokenizer(lines + list(llm_tokenizer_lines or []), llm_vocab, kind)
        model = build(tok, hidden, layers)
        if lm_steps.get(kind):
            print(f"[tiny] pre-training the tiny {kind.upper()}-style LLM ({lm_steps[kind]} steps)", flush=True)
            text = lm_lines if lm_lines is not None and kind == "opt" else lines
            pretrain_tiny_lm(model, tok, text, lm_steps[kind], seed=seed, max_len=lm_max_len if text is lm_lines else 32,
                             one_cycle=lm_one_cycle)
        tok.save_pretrained(paths[kind])
        model.save_pretrained(paths[kind])
    ready.write_text(json.dumps({"fingerprint": fingerprint, **settings, "llms": wanted}))
    return paths


def build_tiny_vision(out_dir: str | Path, kind: str = "blip2", image_size: int = 32, patch_size: int = 8,
                      hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A tiny random vision tower saved as an HF folder with its image-processor config: "blip2"
    (Blip2VisionModel, EVA-style as in BLIP-2) or "clip" (CLIPVisionModel). Random weights: as a frozen
    encoder it is a fixed random patch embedding, enough for the Q-Former to learn from."""
    from transformers import (Blip2VisionConfig, Blip2VisionModel, BlipImageProcessorPil, CLIPImageProcessorPil,
                              CLIPVisionConfig, CLIPVisionModel)

    torch.manual_seed(seed)
    shape = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
                 image_size=image_size, patch_size=patch_size)
    if kind == "blip2":
        # Blip2VisionConfig's default initializer_range (1e-10) suits loading weights, not random towers.
        model, processor = Blip2VisionModel(Blip2VisionConfig(**shape, initializer_range=0.02)), BlipImageProcessorPil(
            size={"height": image_size, "width": image_size})
    elif kind == "clip":
        model, processor = CLIPVisionModel(CLIPVisionConfig(**shape)), CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    else:
        raise ValueError(f"unknown vision kind {kind!r} (blip2 or clip)")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)


def tiny_config(**sections: dict[str, Any]) -> Config:
    """A config preset small enough for CPU tests with these models: one worker, no GPU, few steps; sections
    override it."""
    raw: dict[str, Any] = {
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1, "local_num_cpus": 8},
        "train": {"max_steps": 20, "batch_size_per_worker": 16, "warmup_steps": 5, "lr": 1e-3, "min_lr": 1e-4,
                  "log_every_steps": 5, "checkpoint_every_steps": 10, "grad_clip_norm": 1.0, "precision": "fp32"},
        "model": {"num_query_tokens": 4, "contrastive_dim": 32},
        "data": {"max_txt_len": 24, "shuffle_buffer_rows": 256},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return build_config(raw)
