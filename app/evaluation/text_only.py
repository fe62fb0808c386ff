"""Zero-shot VQA brackets from the frozen LLM alone: what it answers with no picture (blind: the question
alone) and with the picture's true caption as text in place of the soft prompt (oracle).

The text stands where a soft prompt stands in `TrainedBLIP2.generate_ids`: before the text the LLM reads
after a prompt. A decoder-only LLM reads `<context>\\n` and then the prompt as the tokenizer writes it (with
its BOS in front, as after a soft prompt); an encoder-decoder LLM's encoder reads `<context></s>` and then
the prompt. Answers are scored with the VQAv2 metric of `app.evaluation.vqa`, as the image arms are.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from app.evaluation.model import VQA_OPTIONS, GenerationOptions, left_align


def llm_answers(llm_path: str, prompts: Sequence[str], contexts: Optional[Sequence[str]] = None,
                options: GenerationOptions = VQA_OPTIONS, batch_size: int = 64) -> list[str]:
    """Generated answers of the LLM in `llm_path` to `prompts` (each already in the VQA template), each read
    after its context text (None: blind)."""
    from transformers import AutoTokenizer

    from app.models.llm import FrozenLLM

    llm = FrozenLLM.from_pretrained(llm_path)
    tok = AutoTokenizer.from_pretrained(llm_path)
    newline = [] if llm.is_encoder_decoder else tok("\n", add_special_tokens=False).input_ids[-1:]
    stop = newline + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        texts = chunk
        if contexts is not None:
            ctx = contexts[start:start + batch_size]
            if llm.is_encoder_decoder:
                texts = [f"{c}{tok.eos_token} {p}" for c, p in zip(ctx, chunk)]
            else:
                texts = [f"{c}\n{tok.bos_token or ''}{p}" for c, p in zip(ctx, chunk)]
        enc = tok(texts, padding=True, padding_side="right", return_tensors="pt")
        embeds, mask = llm.embed(enc.input_ids), enc.attention_mask
        if not llm.is_encoder_decoder:
            embeds, mask = left_align(embeds, mask)
        with torch.no_grad():
            ids = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=stop,
                                     pad_token_id=tok.pad_token_id, **options.as_kwargs())
        out += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    return out


def text_vqa_brackets(llm_path: str, questions: dict, annotations: dict, template: str = "Question: {} Short answer:",
                      options: GenerationOptions = VQA_OPTIONS, limit: Optional[int] = None) -> dict[str, dict]:
    """{"blind": metrics, "oracle": metrics} on a VQAv2 questions/annotations pair; "oracle" only when every
    annotation carries an `oracle_caption` (the demo's do). Metrics as `score_vqa` gives them (percent, overall
    and per answer type)."""
    from app.evaluation.vqa import score_vqa

    by_qid = {str(a["question_id"]): a for a in annotations["annotations"]}
    asked = [q for q in questions["questions"] if str(q["question_id"]) in by_qid][:limit]
    if not asked:
        raise ValueError("no question has an annotation with answers")
    oracle = all("oracle_caption" in by_qid[str(q["question_id"])] for q in asked)
    truth = {str(q["question_id"]): {"answers": [a["answer"] for a in by_qid[str(q["question_id"])]["answers"]],
                                     "answer_type": by_qid[str(q["question_id"])].get("answer_type", "")}
             for q in asked}
    prompts = [template.format(q["question"]) for q in asked]
    out = {}
    runs = [("blind", None)]
    if oracle:
        runs.append(("oracle", [by_qid[str(q["question_id"])]["oracle_caption"] for q in asked]))
    for name, contexts in runs:
        answers = llm_answers(llm_path, prompts, contexts, options)
        out[name] = score_vqa({str(q["question_id"]): a for q, a in zip(asked, answers)}, truth)[0]
    return out
