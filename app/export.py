"""Export a stage-2 checkpoint as a Hugging Face `Blip2ForConditionalGeneration` folder.

    vision_model.*         <- the frozen BLIP-2 (EVA-style) vision tower (Blip2VisionModel); its
                              post_layernorm <- the trained ln_vision when the Q-Former has one
    query_tokens           <- the Q-Former's learned queries
    qformer.*              <- the Q-Former (query path; the text FFN used only by stage 1 is dropped)
    language_projection.*  <- llm_proj
    language_model.*       <- the frozen LLM (OPT-style causal LM or T5-style seq2seq)
    processor              <- BlipImageProcessor (the encoder's size, mean and std) + the LLM tokenizer
                              with BLIP-2's "<image>" placeholder token

`Blip2ForConditionalGeneration.generate` hands over to the LLM's `generate`, whose defaults come from
the text config: it carries the project's stop ids (a newline for decoder-only LLMs, whose captions were
trained with "\\n" after them, and EOS) and BLIP-2's caption lengths (8-30 new tokens); pass
`num_beams=5` for BLIP-2's beam search. `from_pretrained(out)` then generates the same token ids as
`TrainedBLIP2.generate` for the same pixels and settings. The "<image>" placeholder and embedding rows
no text maps to are listed as `suppress_tokens` in the saved generation config.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from app import storage
from app.errors import UserError
from app.evaluation.model import CAPTION_OPTIONS, TrainedBLIP2

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
_TEXT_FFN = re.compile(r"^encoder\.layer\.\d+\.(intermediate|output)\.")  # not intermediate_query / output_query


class ExportError(UserError, ValueError):
    """A checkpoint that cannot be expressed as Blip2ForConditionalGeneration."""


def _state_dict(model: TrainedBLIP2, llm) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, value in model.vision.tower.state_dict().items():
        state[f"vision_model.{key}"] = value
    if model.qformer.ln_vision is not None:  # the trained ln_vision is what Blip2VisionModel calls post_layernorm
        for key, value in model.qformer.ln_vision.state_dict().items():
            state[f"vision_model.post_layernorm.{key}"] = value
    state["query_tokens"] = model.qformer.query_tokens.detach()
    for key, value in model.qformer.bert.state_dict().items():
        if not _TEXT_FFN.match(key):
            state[f"qformer.{key}"] = value
    for key, value in model.qformer.llm_proj.state_dict().items():
        state[f"language_projection.{key}"] = value
    for key, value in llm.state_dict().items():
        state[f"language_model.{key}"] = value
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def export_blip2(checkpoint: str, out_dir: str | Path, s3: Optional[storage.S3Options] = None) -> dict[str, Any]:
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2VisionModel,
                              BlipImageProcessorPil)
    from transformers.image_utils import PILImageResampling

    model = TrainedBLIP2.from_checkpoint(checkpoint, s3, device="cpu")
    tower = model.vision.tower
    if type(tower) is not Blip2VisionModel:
        raise ExportError(f"Blip2ForConditionalGeneration holds a BLIP-2 vision tower (Blip2VisionModel); this "
                          f"checkpoint was trained on a {type(tower).__name__} ({model.manifest['frozen']['vision']})")
    if model.qformer.num_frames:
        raise ExportError(f"Blip2ForConditionalGeneration takes one image; this checkpoint is a video model "
                          f"({model.qformer.num_frames} frames, temporal embedding): keep it in this project's format")
    llm = model.llm.model
    tokenizer = model.llm_tokenizer
    stop_ids, unused = model.stop_token_ids(), model.unused_token_ids()
    size = model.image_size
    image_processor = BlipImageProcessorPil(
        size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
        image_mean=model.vision.mean.flatten().tolist(), image_std=model.vision.std.flatten().tolist())
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=model.num_query_tokens)  # adds "<image>" to the tokenizer
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = llm.get_input_embeddings().weight.shape[0]
    if image_token_index >= rows:
        llm.resize_token_embeddings(image_token_index + 1, mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight[rows:] = 0  # replaced by the soft prompt; never generated
    never = sorted(set(unused) | {image_token_index})
    generation_defaults = {"eos_token_id": stop_ids if len(stop_ids) > 1 else stop_ids[0],
                           "pad_token_id": tokenizer.pad_token_id, "suppress_tokens": never,
                           **{k: getattr(CAPTION_OPTIONS, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens")}}

    # Blip2ForConditionalGeneration.generate calls the LLM's generate, whose defaults come from text_config.
    text_config = {**llm.config.to_dict(), **generation_defaults}
    qformer_config = model.qformer.config.to_dict()
    qformer_config["use_qformer_text_input"] = False
    config = Blip2Config(vision_config=tower.config.to_dict(), qformer_config=qformer_config, text_config=text_config,
                         num_query_tokens=model.num_query_tokens, image_token_index=image_token_index,
                         image_text_hidden_size=model.qformer.text_proj.out_features)
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(config)
    result = hf.load_state_dict(_state_dict(model, llm), strict=False, assign=True)
    tied = {"language_model.lm_head.weight", "language_model.encoder.embed_tokens.weight",
            "language_model.decoder.embed_tokens.weight", "language_model.model.decoder.embed_tokens.weight"}
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ExportError(f"weights do not fit Blip2ForConditionalGeneration: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(result.unexpected_keys)[:5]}")
    hf.tie_weights()
    if hf.config.text_config.tie_word_embeddings is False and "language_model.lm_head.weight" in result.missing_keys:
        raise ExportError("the LLM's output head is missing from the checkpoint's LLM")
    on_meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.device.type == "meta"]
    if on_meta:
        raise ExportError(f"exported model has unset tensors: {on_meta[:5]}")
    hf.eval()

    # Generation defaults = the project's (BLIP-2's captioning settings, stop ids, suppressed ids).
    for gen in (hf.generation_config, hf.language_model.generation_config):
        for key, value in generation_defaults.items():
            setattr(gen, key, value)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    processor.save_pretrained(out)
    info = {"checkpoint": model.checkpoint, "out": str(out), "llm": model.manifest["frozen"]["llm"],
            "vision": model.manifest["frozen"]["vision"], "encoder_decoder": model.llm.is_encoder_decoder,
            "num_query_tokens": model.num_query_tokens, "image_token_index": image_token_index,
            "stop_token_ids": stop_ids, "prompt": model.prompt}
    logger.info("exported %s to %s", model.checkpoint, out)
    return info


def log_to_mlflow(info: dict, out: str, checkpoint: str, s3, tracking_uri, register) -> dict:
    """Log the exported folder as the "hf_model" artifacts of the checkpoint's training run (a run of its
    own when there is none) and, with `register`, register it as a new version of that model name."""
    from mlflow.exceptions import MlflowException

    from app import tracking
    from app.evaluation.tasks import checkpoint_config

    cfg = checkpoint_config(checkpoint, s3)
    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri)
    run_id = tracking.find_run(uri, cfg.mlflow.experiment, cfg.run.name, cfg.run.storage_path)
    client = tracking.client(uri)
    if run_id is None:
        run_id = tracking.create_run(uri, cfg.mlflow.experiment, f"export-{cfg.run.name}",
                                     {"stage": "export", "checkpoint": checkpoint})
        client.set_terminated(run_id)
    client.log_artifacts(run_id, out, artifact_path="hf_model")
    logged = {"mlflow_run_id": run_id, "tracking_uri": uri, "artifact": f"runs:/{run_id}/hf_model"}
    if register:
        try:
            client.create_registered_model(register)
        except MlflowException:
            pass  # already registered: add a version
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/hf_model"
        version = client.create_model_version(register, source, run_id=run_id,
                                              tags={"format": "transformers.Blip2ForConditionalGeneration",
                                                    "checkpoint": checkpoint})
        logged.update(registered_model=register, version=int(version.version))
    return logged
