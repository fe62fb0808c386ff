"""One small class per training stage: validate inputs, build datasets and the model, save extras.

The training loop (`app.train.loop`) is shared; it asks the stage for everything stage-specific.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from app import storage
from app.config import Config, ConfigError
from app.data import text as text_data
from app.models.llm import FrozenLLM, resolve_dtype
from app.models.pformer import PFormer
from app.models.pformer_lm import PFormerLM, PFormerLossWeights
from app.train.checkpoint import unwrap


def looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path)


def check_model_path(key: str, value: str, s3: storage.S3Options) -> None:
    """Local and s3:// model folders must exist; anything else is taken as a Hugging Face id."""
    if storage.is_s3(value):
        if not storage.exists(value, s3):
            raise ConfigError(f"{key}: no model at {value}")
    elif looks_local(value) and not Path(value).expanduser().is_dir():
        raise ConfigError(f"{key}: no such model folder: {value}")


def local_model(value: str, s3: storage.S3Options | None = None) -> str:
    """A local folder for a model given by HF id, local path, or s3:// URI (downloaded once per node)."""
    if not storage.is_s3(value):
        return value
    import hashlib

    cache = Path(os.environ.get("PFORMER_MODEL_CACHE", Path.home() / ".cache" / "pformer" / "models"))
    target = cache / hashlib.sha1(value.encode()).hexdigest()[:16]
    if not (target / ".complete").exists():
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        storage.download_dir(value, tmp, s3)
        (tmp / ".complete").touch()
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            pass
    return str(target)


def llm_is_encoder_decoder(name_or_path: str) -> bool:
    from transformers import AutoConfig

    return bool(AutoConfig.from_pretrained(name_or_path).is_encoder_decoder)


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut every `<name>_ids`/`<name>_mask` pair to its longest row (data is right-padded to a fixed width)."""
    out = dict(batch)
    for key in batch:
        if key.endswith("_mask"):
            name = key[: -len("_mask")]
            width = max(1, int(batch[key].sum(dim=1).max()))
            out[key] = batch[key][:, :width]
            if f"{name}_ids" in batch:
                out[f"{name}_ids"] = batch[f"{name}_ids"][:, :width]
    return out


class PFormerStage:
    """Stage 0: text only. P-Former learns the soft prompts from which the frozen LLM rebuilds a sentence."""

    name = "pformer"
    loss_keys = ("lm_loss", "contrastive_loss", "vocab_loss")

    def validate(self, cfg: Config, s3: storage.S3Options) -> None:
        if not cfg.data.text:
            raise ConfigError("data.text: a text corpus URI is required for stage 'pformer'")
        try:
            text_data.check_corpus(cfg.data.text, cfg.data.text_format, cfg.data.text_column, s3)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.text: {err}") from None
        check_model_path("model.pformer", cfg.model.pformer, s3)
        check_model_path("model.llm", cfg.model.llm, s3)

    def datasets(self, cfg: Config, counter, s3: storage.S3Options) -> dict[str, Any]:
        llm = local_model(cfg.model.llm, s3)
        cfg = cfg.model_copy(deep=True)
        cfg.model.llm, cfg.model.pformer = llm, local_model(cfg.model.pformer, s3)
        return {"train": text_data.text_dataset(cfg, llm_is_encoder_decoder=llm_is_encoder_decoder(llm),
                                                counter=counter, s3=s3)}

    def build_model(self, cfg: Config, s3: storage.S3Options | None = None) -> PFormerLM:
        tokenizer = text_data.load_tokenizer(local_model(cfg.model.pformer, s3))
        llm = FrozenLLM.from_pretrained(local_model(cfg.model.llm, s3),
                                        dtype=resolve_dtype(cfg.model.llm_dtype, cfg.scaling.use_gpu))
        pformer = PFormer.from_pretrained(local_model(cfg.model.pformer, s3),
                                          num_query_tokens=cfg.model.num_query_tokens, llm_dim=llm.embed_dim,
                                          contrastive_dim=cfg.model.contrastive_dim, temp_init=cfg.model.temp_init)
        loss = cfg.loss.model_dump()
        if loss["vocab_weight"] is None:
            loss["vocab_weight"] = 0.0 if llm.is_encoder_decoder else 1.0
        weights = PFormerLossWeights(**loss)
        protected = tuple(i for i in (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)
                          if i is not None)
        return PFormerLM(pformer, llm, weights, mask_token_id=tokenizer.mask_token_id, protected_ids=protected)

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """LLM tokens processed (input + target), for tokens/s; a device tensor, so no sync per step."""
        return sum(batch[k].sum() for k in ("llm_mask", "llm_target_mask") if k in batch)

    def manifest(self, cfg: Config) -> dict[str, Any]:
        return {"stage": self.name, "frozen": {"llm": cfg.model.llm}, "pformer_init": cfg.model.pformer,
                "num_query_tokens": cfg.model.num_query_tokens}

    def save_extras(self, model: PFormerLM, directory: Path, cfg: Config, s3: storage.S3Options | None = None) -> None:
        """The P-Former's architecture and tokenizer, so stages 1/2 rebuild it from the checkpoint alone."""
        unwrap(model.pformer).save_architecture(directory / "pformer")
        text_data.load_tokenizer(local_model(cfg.model.pformer, s3)).save_pretrained(directory / "pformer")


STAGES = {"pformer": PFormerStage}


def get_stage(name: str):
    if name not in STAGES:
        raise ConfigError(f"stage: '{name}' is not implemented (available: {sorted(STAGES)})")
    return STAGES[name]()
