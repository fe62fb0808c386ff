"""One small class per training stage: the keys it reads, its checks (before Ray starts), its datasets, its
model, its objective (`compute_losses`: the weighted terms of `app.losses`), its checkpoint manifest and
extras. The training loop (`app.train.loop`) is shared; it asks the stage for everything stage-specific.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoTokenizer

from app import storage
from app.config import Config, ConfigError
from app.data import captions as caption_data
from app.data import text as text_data
from app.data.captions import CaptionSpec
from app.data.feature_cache import check_cache, pformer_column, read_manifest
from app.data.samples import cached_dataset, image_text_dataset
from app.data.sources import PictureSubset, check_shards, first_pictures
from app.losses import STAGE_TERMS, with_total
from app.models.composites import (LLMPretrain, PFormerPretrain, QFormerPretrain, Stage0Weights, Stage1Weights,
                                   Stage2Weights)
from app.models.llm import FrozenLLM, llm_embed_dim, llm_is_encoder_decoder, resolve_dtype
from app.models.pformer import HEADS_FILE as PFORMER_HEADS_FILE
from app.models.pformer import PFormer
from app.models.qformer import HEADS_FILE as QFORMER_HEADS_FILE
from app.models.qformer import QFormer
from app.models.vision import VisionEncoder, image_size_for
from app.storage import local_model
from app.train.checkpoint import CheckpointError, check_stage, find_checkpoint, load_submodule, local_checkpoint, unwrap


def check_model_path(key: str, value: str, s3: storage.S3Options) -> None:
    """Local and s3:// model folders must exist; anything else is taken as a Hugging Face id."""
    if storage.is_s3(value):
        if not storage.exists(value, s3):
            raise ConfigError(f"{key}: no model at {value}")
    elif storage.looks_local(value) and not Path(value).expanduser().is_dir():
        hint = (" (run `python -m jobs.prepare_demo` to make the embedded models)"
                if ".demo" in Path(value).parts else "")
        raise ConfigError(f"{key}: no such folder '{value}'{hint}")


# Config keys (or whole sections) every stage reads, and those of the data sections the stages share.
COMMON_READS = ("stage", "run", "storage", "mlflow", "scaling", "train", "data.caption_style", "data.max_chars",
                "data.max_skipped_fraction", "data.max_txt_len", "data.max_words", "data.prefetch_batches",
                "data.shuffle_buffer_rows", "loss.label_smoothing", "model.contrastive_dim", "model.dropout",
                "model.attn_implementation", "model.gradient_checkpointing", "model.llm", "model.llm_dtype",
                "model.num_query_tokens", "model.pformer", "model.temp_init")
IMAGE_TEXT_READS = ("data.caption_column", "data.horizontal_flip", "data.image_column", "data.image_format",
                    "data.image_size", "data.min_crop_scale", "data.train", "data.train_features",
                    "data.train_pictures", "data.val", "data.val_max_batches", "init_from.pformer", "loss.align_weight",
                    "model.cross_attention_freq", "model.frame_pooling", "model.num_frames", "model.qformer", "model.vision",
                    "model.vision_dtype")


class Stage:
    """What the loop asks every stage for. `compute_losses(model, batch)` returns the named loss terms of
    one step, each already weighted (the weights resolved from `cfg.loss` when the model was built); the
    step's loss is their sum (`losses`). `reads`: the config keys the stage uses beyond COMMON_READS (a
    sweep over any other key would train identical trials)."""

    name = ""
    loss_keys: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()

    def reads_key(self, key: str) -> bool:
        return any(key == r or key.startswith(r + ".") for r in COMMON_READS + self.reads)

    def compute_losses(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This stage's weighted terms on the composite's output (`app.losses.STAGE_TERMS`)."""
        return STAGE_TERMS[self.name](model, batch)

    def losses(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted terms and their sum under "loss" (what the loop logs and backpropagates)."""
        return with_total(self.compute_losses(model, batch))


class PFormerStage(Stage):
    """Stage 0: text only. P-Former learns the soft prompts from which the frozen LLM rebuilds a sentence."""

    name = "pformer"
    loss_keys = ("lm_loss", "contrastive_loss", "vocab_loss")
    reads = ("data.text", "data.text_column", "data.text_format", "loss.contrastive_views", "loss.contrastive_weight",
             "loss.gather_with_grad", "loss.lm_weight", "loss.mask_prob", "loss.vocab_weight",
             "model.llm_dropout_in_training")
    limit_skipped = False  # blank lines are normal in text corpora: counted, never a reason to stop

    def validate(self, cfg: Config, s3: storage.S3Options) -> Config:
        if not cfg.data.text:
            raise ConfigError("data.text: a text corpus URI is required for stage 'pformer'")
        try:
            text_data.check_corpus(cfg.data.text, cfg.data.text_format, cfg.data.text_column, s3)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.text: {err}") from None
        check_model_path("model.pformer", cfg.model.pformer, s3)
        check_model_path("model.llm", cfg.model.llm, s3)
        return cfg

    def datasets(self, cfg: Config, counter, s3: storage.S3Options) -> dict[str, Any]:
        llm = local_model(cfg.model.llm, s3)
        cfg = cfg.model_copy(deep=True)
        cfg.model.llm, cfg.model.pformer = llm, local_model(cfg.model.pformer, s3)
        return {"train": text_data.text_dataset(cfg, llm_is_encoder_decoder=llm_is_encoder_decoder(llm),
                                                counter=counter, s3=s3)}

    def build_model(self, cfg: Config, s3: storage.S3Options | None = None) -> PFormerPretrain:
        tokenizer = text_data.load_tokenizer(local_model(cfg.model.pformer, s3))
        llm = FrozenLLM.from_pretrained(local_model(cfg.model.llm, s3),
                                        dtype=resolve_dtype(cfg.model.llm_dtype, cfg.scaling.use_gpu))
        pformer = PFormer.from_pretrained(local_model(cfg.model.pformer, s3),
                                          num_query_tokens=cfg.model.num_query_tokens, llm_dim=llm.embed_dim,
                                          contrastive_dim=cfg.model.contrastive_dim, temp_init=cfg.model.temp_init,
                                          dropout=cfg.model.dropout)
        loss = cfg.loss
        weights = Stage0Weights(
            lm_weight=loss.lm_weight, contrastive_weight=loss.contrastive_weight,
            vocab_weight=loss.vocab_weight if loss.vocab_weight is not None else (0.0 if llm.is_encoder_decoder else 1.0),
            contrastive_views=loss.contrastive_views, label_smoothing=loss.label_smoothing, mask_prob=loss.mask_prob,
            gather_with_grad=loss.gather_with_grad)
        protected = tuple(i for i in (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)
                          if i is not None)
        return PFormerPretrain(pformer, llm, weights, mask_token_id=tokenizer.mask_token_id, protected_ids=protected,
                         llm_dropout=cfg.model.llm_dropout_in_training)

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """LLM tokens processed (input + target), for tokens/s; a device tensor, so no sync per step."""
        return sum(batch[k].sum() for k in ("llm_mask", "llm_target_mask") if k in batch)

    def manifest(self, cfg: Config) -> dict[str, Any]:
        return {"stage": self.name, "frozen": {"llm": cfg.model.llm}, "pformer_init": cfg.model.pformer,
                "num_query_tokens": cfg.model.num_query_tokens}

    def save_extras(self, model: PFormerPretrain, directory: Path, cfg: Config, s3: storage.S3Options | None = None) -> None:
        """The P-Former's architecture and tokenizer, so stages 1/2 rebuild it from the checkpoint alone."""
        unwrap(model.pformer).save_architecture(directory / "pformer")
        text_data.load_tokenizer(local_model(cfg.model.pformer, s3)).save_pretrained(directory / "pformer")


# ---------------------------------------------------------------------------------------------
# stages 1 and 2


class ImageTextStage(Stage):
    """What stages 1 and 2 share: shard datasets, the frozen image encoder and the P-Former targets.
    Each stage says which tokenizers its captions need (`caption_spec`)."""

    name = ""
    loss_keys: tuple[str, ...] = ()
    limit_skipped = True  # data.max_skipped_fraction applies

    def _check_data(self, cfg: Config, s3: storage.S3Options) -> None:
        if not cfg.data.train and not cfg.data.train_features:
            raise ConfigError(f"data.train: image-text shards (or data.train_features, a feature cache) are required "
                              f"for stage '{self.name}'")
        for key in ("train", "val"):
            uri = getattr(cfg.data, key)
            if uri:
                try:
                    check_shards(uri, cfg.data.image_format, s3)
                except (FileNotFoundError, ValueError, OSError) as err:
                    raise ConfigError(f"data.{key}: {err}") from None
        check_model_path("model.vision", cfg.model.vision, s3)
        check_model_path("model.llm", cfg.model.llm, s3)
        self.picture_subset(cfg, s3)

    def picture_subset(self, cfg: Config, s3: storage.S3Options) -> Optional[PictureSubset]:
        """data.train_pictures: the pictures this run trains on (None: all of data.train)."""
        if cfg.data.train_pictures is None:
            return None
        if cfg.data.train_features:
            raise ConfigError("data.train_pictures selects pictures of data.train shards; a feature cache "
                              "(data.train_features) is read whole: cache the subset's shards instead")
        try:
            return first_pictures(cfg.data.train, cfg.data.train_pictures, cfg.data.image_format, s3,
                                             cfg.data.caption_column, cfg.data.image_column)
        except (ValueError, OSError) as err:
            raise ConfigError(f"data.train_pictures: {err}") from None

    def _check_pformer(self, cfg: Config, uri: Optional[str], llm_dim: int, s3: storage.S3Options) -> Optional[str]:
        """Resolve and check the P-Former checkpoint the alignment loss needs (None when the weight is 0)."""
        weight = cfg.loss.align_weight
        if weight == 0:
            return None
        if not uri:
            raise ConfigError(f"loss.align_weight is {weight:g} for stage '{self.name}', which needs a stage-0 "
                              f"P-Former: set init_from.pformer (or loss.align_weight=0 for plain BLIP-2)")
        uri, manifest = find_checkpoint(uri, ("pformer",), s3, key="init_from.pformer",
                                        purpose=f"the alignment loss of stage '{self.name}'")
        heads = storage.read_json(storage.join(uri, "pformer", PFORMER_HEADS_FILE), s3)
        if heads["num_query_tokens"] != cfg.model.num_query_tokens:
            raise ConfigError(f"init_from.pformer predicts {heads['num_query_tokens']} prompts but "
                              f"model.num_query_tokens is {cfg.model.num_query_tokens}: the P-Former and the Q-Former "
                              f"must have the same prompt length (train a P-Former with that length)")
        if heads["llm_dim"] != llm_dim:
            raise ConfigError(f"init_from.pformer was trained for an LLM of width {heads['llm_dim']} "
                              f"({manifest.get('frozen', {}).get('llm')}); this run's LLM has width {llm_dim}")
        return uri

    def _check_cache(self, cfg: Config, s3: storage.S3Options) -> None:
        """data.train_features must be a finished cache made with this run's frozen models (after the P-Former
        is resolved): CacheError naming the mismatch otherwise."""
        if cfg.data.train_features:
            check_cache(cfg, s3)

    def datasets(self, cfg: Config, counter, s3: storage.S3Options) -> dict[str, Any]:
        size, spec = image_size_for(cfg, s3), self.caption_spec(cfg, s3)
        if cfg.data.train_features:
            manifest = read_manifest(cfg.data.train_features, s3)
            cached_spec = replace(spec, pformer=None) if pformer_column(manifest) else spec
            train = cached_dataset(cfg.data.train_features, cfg, manifest, train=True, image_size=size,
                                   captions=cached_spec, counter=counter, s3=s3)
        else:
            subset = self.picture_subset(cfg, s3)
            if subset is not None:
                print(f"[{self.name}] data.train_pictures={subset.count}: training on {subset.describe()}", flush=True)
            train = image_text_dataset(cfg.data.train, cfg, train=True, image_size=size, captions=spec,
                                                  counter=counter, s3=s3, subset=subset)
        out = {"train": train}
        if cfg.data.val:
            rows = cfg.data.val_max_batches * cfg.train.batch_size_per_worker * cfg.scaling.world_size
            out["val"] = image_text_dataset(cfg.data.val, cfg, train=False, image_size=size, captions=spec,
                                                       counter=counter, count_prefix="val_", s3=s3).limit(rows)
        return out

    def vision(self, cfg: Config, s3: storage.S3Options | None) -> VisionEncoder:
        return VisionEncoder.from_pretrained(storage.local_model(cfg.model.vision, s3),
                                             dtype=resolve_dtype(cfg.model.vision_dtype, cfg.scaling.use_gpu),
                                             final_layernorm=not cfg.model.train_ln_vision)

    def pformer(self, cfg: Config, s3: storage.S3Options | None) -> Optional[PFormer]:
        if cfg.loss.align_weight == 0:
            return None
        return PFormer.load_frozen(cfg.init_from.pformer, s3)

    def manifest(self, cfg: Config) -> dict[str, Any]:
        return {"stage": self.name, "frozen": {"vision": cfg.model.vision, "pformer": cfg.init_from.pformer,
                                               "llm": cfg.model.llm},
                "num_query_tokens": cfg.model.num_query_tokens, "num_frames": cfg.model.num_frames,
                "train_features": cfg.data.train_features, "align_weight": cfg.loss.align_weight,
                "ln_vision": cfg.model.train_ln_vision}

    def save_extras(self, model, directory: Path, cfg: Config, s3: storage.S3Options | None = None) -> None:
        """The Q-Former's architecture and tokenizer ([DEC] included), for stage 2, evaluation and export."""
        unwrap(model.qformer).save_architecture(directory / "qformer")
        model.qformer_tokenizer.save_pretrained(directory / "qformer")


class QFormerStage(ImageTextStage):
    """Stage 1: Q-Former representation learning (ITC, ITM, ITG) plus the P-Former alignment loss."""

    name = "qformer"
    loss_keys = ("itc_loss", "itm_loss", "itg_loss", "align_loss", "align_mse")
    reads = IMAGE_TEXT_READS + ("loss.gather_with_grad", "loss.itc_same_image_positives", "loss.itc_weight",
                                "loss.itg_weight", "loss.itm_weight", "model.train_ln_vision")

    def validate(self, cfg: Config, s3: storage.S3Options) -> Config:
        self._check_data(cfg, s3)
        check_model_path("model.qformer", cfg.model.qformer, s3)
        cfg = cfg.model_copy(deep=True)
        llm_dim = llm_embed_dim(storage.local_model(cfg.model.llm, s3))
        cfg.init_from.pformer = self._check_pformer(cfg, cfg.init_from.pformer, llm_dim, s3)
        if cfg.loss.itc_same_image_positives and cfg.data.train_features:
            raise ConfigError("loss.itc_same_image_positives needs the image ids of data.train shards; a feature cache "
                              "(data.train_features) does not carry them")
        self._check_cache(cfg, s3)
        if cfg.loss.itm_weight > 0 and cfg.train.batch_size_per_worker * cfg.scaling.world_size < 2:
            raise ConfigError("train.batch_size_per_worker: ITM draws negatives from the global batch, which needs "
                              "at least 2 samples")
        return cfg

    def caption_spec(self, cfg: Config, s3) -> CaptionSpec:
        pformer = storage.join(cfg.init_from.pformer, "pformer") if cfg.init_from.pformer else None
        return CaptionSpec(qformer=cfg.model.qformer, pformer=pformer, max_txt_len=cfg.data.max_txt_len,
                                      max_chars=cfg.data.max_chars, caption_style=cfg.data.caption_style,
                                      max_words=cfg.data.max_words)

    def build_model(self, cfg: Config, s3: storage.S3Options | None = None) -> QFormerPretrain:
        vision = self.vision(cfg, s3)
        qformer, tokenizer = QFormer.from_bert(
            storage.local_model(cfg.model.qformer, s3), num_query_tokens=cfg.model.num_query_tokens,
            encoder_hidden_size=vision.width, llm_dim=llm_embed_dim(storage.local_model(cfg.model.llm, s3)),
            cross_attention_frequency=cfg.model.cross_attention_freq, contrastive_dim=cfg.model.contrastive_dim,
            temp_init=cfg.model.temp_init, dropout=cfg.model.dropout, num_frames=cfg.model.num_frames or 0,
            frame_pooling=cfg.model.frame_pooling, ln_vision=cfg.model.train_ln_vision)
        weights = Stage1Weights(itc=cfg.loss.itc_weight, itm=cfg.loss.itm_weight, itg=cfg.loss.itg_weight,
                                align=cfg.loss.align_weight, label_smoothing=cfg.loss.label_smoothing,
                                gather_with_grad=cfg.loss.gather_with_grad,
                                same_image_positives=cfg.loss.itc_same_image_positives)
        model = QFormerPretrain(vision, qformer, self.pformer(cfg, s3), weights)
        model.qformer_tokenizer = tokenizer
        return model

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["qformer_mask"].sum()

    def manifest(self, cfg: Config) -> dict[str, Any]:
        return {**super().manifest(cfg), "qformer_init": cfg.model.qformer}


class LLMStage(ImageTextStage):
    """Stage 2: Q-Former -> llm_proj -> frozen LLM (LM or prefix-LM loss) plus the P-Former alignment loss."""

    name = "llm"
    loss_keys = ("lm_loss", "align_loss", "align_mse")
    reads = IMAGE_TEXT_READS + ("init_from.qformer", "loss.lm_weight", "model.llm_dropout_in_training", "model.prompt")

    def validate(self, cfg: Config, s3: storage.S3Options) -> Config:
        self._check_data(cfg, s3)
        cfg = cfg.model_copy(deep=True)
        if not cfg.init_from.qformer:
            raise ConfigError("init_from.qformer: stage 'llm' starts from a stage-1 checkpoint; set it to the "
                              "checkpoint (or run folder) of jobs.pretrain_qformer")
        cfg.init_from.qformer, manifest = find_checkpoint(cfg.init_from.qformer, ("qformer",), s3,
                                                          key="init_from.qformer", purpose="stage 2")
        frozen = manifest.get("frozen", {})
        if frozen.get("vision") and frozen["vision"] != cfg.model.vision:
            raise ConfigError(f"model.vision is {cfg.model.vision}, but the stage-1 checkpoint "
                              f"{cfg.init_from.qformer} was trained on {frozen['vision']}")
        heads = storage.read_json(storage.join(cfg.init_from.qformer, "qformer", QFORMER_HEADS_FILE), s3)
        if heads["num_query_tokens"] != cfg.model.num_query_tokens:
            raise ConfigError(f"model.num_query_tokens is {cfg.model.num_query_tokens}, but the stage-1 Q-Former has "
                              f"{heads['num_query_tokens']} queries")
        trained_frames, wanted_frames = heads.get("num_frames", 0), cfg.model.num_frames or 0
        if trained_frames != wanted_frames:
            what = {0: "images"}.get(trained_frames, f"clips of {trained_frames} frames")
            raise ConfigError(f"model.num_frames is {cfg.model.num_frames}, but the stage-1 Q-Former was trained on {what}: "
                              f"stage 2 samples frames as stage 1 did (set model.num_frames={trained_frames or 'null'})")
        if trained_frames and heads.get("frame_pooling", "concat") != cfg.model.frame_pooling:
            raise ConfigError(f"model.frame_pooling is {cfg.model.frame_pooling}, but the stage-1 Q-Former pools frames "
                              f"by {heads['frame_pooling']}")
        # The image tokens must reach the Q-Former as in stage 1: its trained ln_vision (tokens before the tower's
        # final LayerNorm), or the tower's frozen LayerNorm for Q-Formers trained without one.
        trained_ln = bool(heads.get("ln_vision", False))
        if trained_ln != cfg.model.train_ln_vision:
            how = "with its own trainable ln_vision" if trained_ln else "on the tower's frozen final LayerNorm"
            print(f"[llm] model.train_ln_vision={str(trained_ln).lower()}, as the stage-1 Q-Former was trained ({how})",
                  flush=True)
            cfg.model.train_ln_vision = trained_ln
        llm_dim = llm_embed_dim(storage.local_model(cfg.model.llm, s3))
        if heads["llm_dim"] != llm_dim:
            raise ConfigError(f"the stage-1 Q-Former's llm_proj_q maps to width {heads['llm_dim']}, but model.llm "
                              f"({cfg.model.llm}) has width {llm_dim}: run stage 1 with the same model.llm")
        # The P-Former: as configured, else the one stage 1 was aligned to (recorded in its manifest).
        cfg.init_from.pformer = self._check_pformer(cfg, cfg.init_from.pformer or frozen.get("pformer"), llm_dim, s3)
        self._check_cache(cfg, s3)
        return cfg

    def caption_spec(self, cfg: Config, s3) -> CaptionSpec:
        pformer = storage.join(cfg.init_from.pformer, "pformer") if cfg.init_from.pformer else None
        return CaptionSpec(pformer=pformer, llm=cfg.model.llm,
                                      llm_is_encoder_decoder=llm_is_encoder_decoder(storage.local_model(cfg.model.llm, s3)),
                                      prompt=cfg.model.prompt, max_txt_len=cfg.data.max_txt_len,
                                      max_chars=cfg.data.max_chars, caption_style=cfg.data.caption_style,
                                      max_words=cfg.data.max_words)

    def build_model(self, cfg: Config, s3: storage.S3Options | None = None) -> LLMPretrain:
        directory = local_checkpoint(cfg.init_from.qformer, "qformer", s3)
        check_stage(directory, "qformer", role="init_from.qformer")
        qformer = QFormer.from_architecture(Path(directory) / "qformer", dropout=cfg.model.dropout)
        load_submodule(qformer, directory, "qformer")
        llm_path = storage.local_model(cfg.model.llm, s3)
        llm = FrozenLLM.from_pretrained(llm_path, dtype=resolve_dtype(cfg.model.llm_dtype, cfg.scaling.use_gpu))
        prompt_length = 0 if llm.is_encoder_decoder else caption_data.prompt_length(llm_path, cfg.model.prompt)
        weights = Stage2Weights(lm=cfg.loss.lm_weight, align=cfg.loss.align_weight)
        if (qformer.ln_vision is not None) != cfg.model.train_ln_vision:
            raise CheckpointError(f"init_from.qformer: the Q-Former {'has' if qformer.ln_vision is not None else 'has no'} "
                                  f"trained ln_vision but model.train_ln_vision is {cfg.model.train_ln_vision}")
        model = LLMPretrain(self.vision(cfg, s3), qformer, llm, self.pformer(cfg, s3), weights, prompt_length,
                            llm_dropout=cfg.model.llm_dropout_in_training)
        model.qformer_tokenizer = AutoTokenizer.from_pretrained(Path(directory) / "qformer")
        return model

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(batch[k].sum() for k in ("llm_mask", "llm_target_mask") if k in batch)

    def manifest(self, cfg: Config) -> dict[str, Any]:
        return {**super().manifest(cfg), "init_from": {"qformer": cfg.init_from.qformer}, "prompt": cfg.model.prompt}


STAGES = {"pformer": PFormerStage, "qformer": QFormerStage, "llm": LLMStage}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"stage: '{name}' is not implemented (available: {sorted(STAGES)})")
    return STAGES[name]()

