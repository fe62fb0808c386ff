"""How well a stage-0 P-Former's prompts carry a sentence: the frozen LLM, given only the P-Former's prompt
for a caption, regenerates it (greedy) — exactly, and token by token (teacher-forced next-token accuracy).

The paper's P-Former is trained until its prompts reconstruct the text well; the Q-Former is then aligned to
those prompts, so a P-Former that reconstructs poorly is a poor target. Decoder-only LLMs only: the prompt
is followed by the BOS the caption was trained behind, and generation stops at the newline that ends every
training caption (an encoder-decoder P-Former is trained to continue a prefix, not to restate a caption).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from app import storage


def pformer_reconstruction(checkpoint: str, captions: Sequence[str], s3: Optional[storage.S3Options] = None,
                           batch_size: int = 64, examples: int = 5) -> dict:
    """{"exact": share regenerated exactly, "token_accuracy": teacher-forced next-token accuracy over the
    caption's tokens and its newline, "captions": count, "examples": [(caption, regenerated)]} for the stage-0
    checkpoint (or run folder) `checkpoint`. Captions are normalised as training normalised them."""
    from app.data.text import load_tokenizer, normalise_caption
    from app.evaluation.tasks import checkpoint_config
    from app.models.llm import IGNORE_INDEX, FrozenLLM
    from app.models.pformer import PFormer
    from app.train.checkpoint import find_checkpoint, local_checkpoint

    uri, manifest = find_checkpoint(checkpoint, ("pformer",), s3, purpose="measuring reconstruction")
    cfg = checkpoint_config(uri, s3)
    pformer = PFormer.load_frozen(uri, s3)
    llm_path = storage.local_model(manifest.get("frozen", {}).get("llm") or cfg.model.llm, s3)
    llm = FrozenLLM.from_pretrained(llm_path)
    if llm.is_encoder_decoder:
        raise ValueError("reconstruction is measured for decoder-only LLMs (the stage-0 T5 objective continues a prefix)")
    bert_tok = load_tokenizer(f"{local_checkpoint(uri, 'pformer', s3)}/pformer")
    llm_tok = load_tokenizer(llm_path)
    newline = llm_tok("\n", add_special_tokens=False).input_ids[-1]
    data = cfg.data
    texts = [normalise_caption(t, data.caption_style, data.max_words, data.max_chars) for t in captions]
    texts = [t for t in texts if t]
    exact, right, total, shown = 0, 0, 0, []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = bert_tok(chunk, padding=True, truncation=True, max_length=data.max_txt_len, return_tensors="pt")
        target = llm_tok([t + "\n" for t in chunk], padding=True, truncation=True, max_length=data.max_txt_len,
                         return_tensors="pt")
        with torch.no_grad():
            prompts = pformer(enc.input_ids, enc.attention_mask).prompts  # (B, Q, D)
            logits = llm.decoder_logits(prompts, target.input_ids, target.attention_mask)  # (B, Q + L, V)
            q = prompts.shape[1]
            predicted = logits[:, q:-1].argmax(-1)  # position t predicts text token t + 1
            labels = target.input_ids[:, 1:].masked_fill(target.attention_mask[:, 1:] == 0, IGNORE_INDEX)
            scored = labels != IGNORE_INDEX
            right += int(((predicted == labels) & scored).sum())
            total += int(scored.sum())
            bos = llm.embed(target.input_ids[:, :1])  # the caption's BOS, as in training
            ids = llm.model.generate(inputs_embeds=torch.cat([prompts.to(llm.dtype), bos], 1),
                                     attention_mask=torch.ones(prompts.shape[0], q + 1, dtype=torch.long),
                                     do_sample=False, num_beams=1, max_new_tokens=data.max_txt_len,
                                     eos_token_id=[newline, llm_tok.eos_token_id], pad_token_id=llm_tok.pad_token_id)
        regenerated = [t.strip() for t in llm_tok.batch_decode(ids, skip_special_tokens=True)]
        exact += sum(a == b for a, b in zip(chunk, regenerated))
        shown += list(zip(chunk, regenerated))[: max(0, examples - len(shown))]
    return {"exact": round(exact / len(texts), 4) if texts else None,
            "token_accuracy": round(right / total, 4) if total else None, "captions": len(texts), "examples": shown}
