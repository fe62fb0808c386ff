"""One small class per training stage: validate inputs, build datasets and the model, save extras.

The training loop (`app.train.loop`) is shared; it asks the stage for everything stage-specific.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs
import torch

from app import storage
from app.storage import local_model
from app.config import Config, ConfigError
from app.data import images as image_data
from app.data import text as text_data
from app.models.frozen import freeze
from app.models.llm import FrozenLLM, resolve_dtype
from app.models.pformer import HEADS_FILE as PFORMER_HEADS_FILE
from app.models.pformer import PFormer
from app.models.pformer_lm import PFormerLM, PFormerLossWeights
from app.models.qformer import HEADS_FILE as QFORMER_HEADS_FILE
from app.train.checkpoint import (MANIFEST_FILE, WEIGHTS_FILE, CheckpointError, check_stage, load_submodule,
                                  unwrap)


def looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path)


def check_model_path(key: str, value: str, s3: storage.S3Options) -> None:
    """Local and s3:// model folders must exist; anything else is taken as a Hugging Face id."""
    if storage.is_s3(value):
        if not storage.exists(value, s3):
            raise ConfigError(f"{key}: no model at {value}")
    elif looks_local(value) and not Path(value).expanduser().is_dir():
        raise ConfigError(f"{key}: no such model folder: {value}")


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

    def build_model(self, cfg: Config, s3: storage.S3Options | None = None) -> PFormerLM:
        tokenizer = text_data.load_tokenizer(local_model(cfg.model.pformer, s3))
        llm = FrozenLLM.from_pretrained(local_model(cfg.model.llm, s3),
                                        dtype=resolve_dtype(cfg.model.llm_dtype, cfg.scaling.use_gpu))
        pformer = PFormer.from_pretrained(local_model(cfg.model.pformer, s3),
                                          num_query_tokens=cfg.model.num_query_tokens, llm_dim=llm.embed_dim,
                                          contrastive_dim=cfg.model.contrastive_dim, temp_init=cfg.model.temp_init,
                                          dropout=cfg.model.dropout)
        loss = cfg.loss
        weights = PFormerLossWeights(
            lm_weight=loss.lm_weight, contrastive_weight=loss.contrastive_weight,
            vocab_weight=loss.vocab_weight if loss.vocab_weight is not None else (0.0 if llm.is_encoder_decoder else 1.0),
            contrastive_views=loss.contrastive_views, label_smoothing=loss.label_smoothing, mask_prob=loss.mask_prob,
            gather_with_grad=loss.gather_with_grad)
        protected = tuple(i for i in (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)
                          if i is not None)
        return PFormerLM(pformer, llm, weights, mask_token_id=tokenizer.mask_token_id, protected_ids=protected,
                         llm_dropout=cfg.model.llm_dropout_in_training)

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


# ---------------------------------------------------------------------------------------------
# stages 1 and 2


def resolve_checkpoint(key: str, uri: str, s3: storage.S3Options) -> str:
    """`uri` when it is a checkpoint (holds manifest.json), else the latest `checkpoint_*` inside it (a run
    folder `storage_path/name`). ConfigError naming `key` when neither."""
    if storage.exists(storage.join(uri, MANIFEST_FILE), s3):
        return uri
    try:
        fs, path = storage.resolve(uri, s3)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise ConfigError(f"{key}: cannot list {uri}: {err}") from None
    found = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_"))
    for name in reversed(found):
        candidate = storage.join(uri, name)
        if storage.exists(storage.join(candidate, MANIFEST_FILE), s3):
            return candidate
    raise ConfigError(f"{key}: no checkpoint at {uri} (expected a checkpoint folder with {MANIFEST_FILE}, "
                      f"or a run folder with checkpoint_* folders)")


def read_json(uri: str, s3: storage.S3Options | None = None) -> dict[str, Any]:
    fs, path = storage.resolve(uri, s3)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def checkpoint_manifest(key: str, uri: str, expected: str, s3: storage.S3Options) -> dict[str, Any]:
    manifest = read_json(storage.join(uri, MANIFEST_FILE), s3)
    if manifest.get("stage") != expected:
        raise CheckpointError(f"{key}: {uri} is a '{manifest.get('stage')}' checkpoint; a '{expected}' checkpoint "
                              f"is needed (stage {STAGE_NUMBER[expected]})")
    return manifest


def local_checkpoint(uri: str, part: str, s3: storage.S3Options | None) -> str:
    """A local folder holding a checkpoint's weights, manifest and the named extras folder (no optimiser)."""
    return storage.local_model(uri, s3, only=(WEIGHTS_FILE, MANIFEST_FILE, part))


def load_frozen_pformer(uri: str, s3: storage.S3Options | None) -> PFormer:
    """The stage-0 P-Former from its checkpoint, strictly (every weight present and matching), frozen."""
    directory = local_checkpoint(uri, "pformer", s3)
    check_stage(directory, "pformer", role="init_from.pformer")
    pformer = PFormer.from_architecture(Path(directory) / "pformer")
    load_submodule(pformer, directory, "pformer")
    return freeze(pformer)


def llm_embed_dim(name_or_path: str) -> int:
    """Width of the LLM's input embeddings, from its config alone (no weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    for attr in ("word_embed_proj_dim", "d_model", "hidden_size", "n_embd"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    raise ConfigError(f"model.llm: cannot tell the embedding width of {name_or_path}")


class ImageTextStage:
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
                    image_data.check_shards(uri, cfg.data.image_format, s3)
                except (FileNotFoundError, ValueError, OSError) as err:
                    raise ConfigError(f"data.{key}: {err}") from None
        check_model_path("model.vision", cfg.model.vision, s3)
        check_model_path("model.llm", cfg.model.llm, s3)
        self.picture_subset(cfg, s3)

    def picture_subset(self, cfg: Config, s3: storage.S3Options) -> Optional[image_data.PictureSubset]:
        """data.train_pictures: the pictures this run trains on (None: all of data.train)."""
        if cfg.data.train_pictures is None:
            return None
        if cfg.data.train_features:
            raise ConfigError("data.train_pictures selects pictures of data.train shards; a feature cache "
                              "(data.train_features) is read whole: cache the subset's shards instead")
        try:
            return image_data.first_pictures(cfg.data.train, cfg.data.train_pictures, cfg.data.image_format, s3,
                                             cfg.data.caption_column, cfg.data.image_column)
        except (ValueError, OSError) as err:
            raise ConfigError(f"data.train_pictures: {err}") from None

    def _check_pformer(self, cfg: Config, uri: Optional[str], llm_dim: int, s3: storage.S3Options) -> Optional[str]:
        """Resolve and check the P-Former checkpoint the alignment loss needs (None when the weight is 0)."""
        weight = cfg.loss.align_weight_for(self.name)
        if weight == 0:
            return None
        if not uri:
            raise ConfigError(f"loss.align_weight is {weight:g} for stage '{self.name}', which needs a stage-0 "
                              f"P-Former: set init_from.pformer (or loss.align_weight=0 for plain BLIP-2)")
        uri = resolve_checkpoint("init_from.pformer", uri, s3)
        manifest = checkpoint_manifest("init_from.pformer", uri, "pformer", s3)
        heads = read_json(storage.join(uri, "pformer", PFORMER_HEADS_FILE), s3)
        if heads["num_query_tokens"] != cfg.model.num_query_tokens:
            raise ConfigError(f"init_from.pformer predicts {heads['num_query_tokens']} prompts but "
                              f"model.num_query_tokens is {cfg.model.num_query_tokens}: the P-Former and the Q-Former "
                              f"must have the same prompt length (train a P-Former with that length)")
        if heads["llm_dim"] != llm_dim:
            raise ConfigError(f"init_from.pformer was trained for an LLM of width {heads['llm_dim']} "
                              f"({manifest.get('frozen', {}).get('llm')}); this run's LLM has width {llm_dim}")
        return uri

    def image_size(self, cfg: Config, s3: storage.S3Options | None) -> int:
        from app.models.vision import vision_config

        return cfg.data.image_size or int(vision_config(storage.local_model(cfg.model.vision, s3)).image_size)

    def _check_cache(self, cfg: Config, s3: storage.S3Options) -> None:
        """data.train_features must be a finished cache made with this run's frozen models (after the P-Former
        is resolved): CacheError naming the mismatch otherwise."""
        if cfg.data.train_features:
            from app.cache import check_cache

            check_cache(cfg, s3)

    def datasets(self, cfg: Config, counter, s3: storage.S3Options) -> dict[str, Any]:
        size, spec = self.image_size(cfg, s3), self.caption_spec(cfg, s3)
        if cfg.data.train_features:
            from dataclasses import replace

            from app.cache import read_manifest
            from app.data.features import cached_dataset, pformer_column

            manifest = read_manifest(cfg.data.train_features, s3)
            cached_spec = replace(spec, pformer=None) if pformer_column(manifest) else spec
            train = cached_dataset(cfg.data.train_features, cfg, manifest, train=True, image_size=size,
                                   captions=cached_spec, counter=counter, s3=s3)
        else:
            subset = self.picture_subset(cfg, s3)
            if subset is not None:
                print(f"[{self.name}] data.train_pictures={subset.count}: training on {subset.describe()}", flush=True)
            train = image_data.image_text_dataset(cfg.data.train, cfg, train=True, image_size=size, captions=spec,
                                                  counter=counter, s3=s3, subset=subset)
        out = {"train": train}
        if cfg.data.val:
            rows = cfg.data.val_max_batches * cfg.train.batch_size_per_worker * cfg.scaling.num_workers
            out["val"] = image_data.image_text_dataset(cfg.data.val, cfg, train=False, image_size=size, captions=spec,
                                                       counter=counter, count_prefix="val_", s3=s3).limit(rows)
        return out

    def vision(self, cfg: Config, s3: storage.S3Options | None):
        from app.models.vision import VisionEncoder

        return VisionEncoder.from_pretrained(storage.local_model(cfg.model.vision, s3),
                                             dtype=resolve_dtype(cfg.model.vision_dtype, cfg.scaling.use_gpu),
                                             final_layernorm=not cfg.model.train_ln_vision)

    def pformer(self, cfg: Config, s3: storage.S3Options | None) -> Optional[PFormer]:
        if cfg.loss.align_weight_for(self.name) == 0:
            return None
        return load_frozen_pformer(cfg.init_from.pformer, s3)

    def save_extras(self, model, directory: Path, cfg: Config, s3: storage.S3Options | None = None) -> None:
        """The Q-Former's architecture and tokenizer ([DEC] included), for stage 2, evaluation and export."""
        unwrap(model.qformer).save_architecture(directory / "qformer")
        model.qformer_tokenizer.save_pretrained(directory / "qformer")


class QFormerStage(ImageTextStage):
    """Stage 1: Q-Former representation learning (ITC, ITM, ITG) plus the P-Former alignment loss."""

    name = "qformer"
    loss_keys = ("itc_loss", "itm_loss", "itg_loss", "align_loss", "align_mse")

    def validate(self, cfg: Config, s3: storage.S3Options) -> Config:
        self._check_data(cfg, s3)
        check_model_path("model.qformer", cfg.model.qformer, s3)
        cfg = cfg.model_copy(deep=True)
        llm_dim = llm_embed_dim(storage.local_model(cfg.model.llm, s3))
        cfg.init_from.pformer = self._check_pformer(cfg, cfg.init_from.pformer, llm_dim, s3)
        cfg.loss.align_weight = cfg.loss.align_weight_for(self.name)
        if cfg.loss.itc_same_image_positives and cfg.data.train_features:
            raise ConfigError("loss.itc_same_image_positives needs the image ids of data.train shards; a feature cache "
                              "(data.train_features) does not carry them")
        self._check_cache(cfg, s3)
        if cfg.loss.itm_weight > 0 and cfg.train.batch_size_per_worker * cfg.scaling.num_workers < 2:
            raise ConfigError("train.batch_size_per_worker: ITM draws negatives from the global batch, which needs "
                              "at least 2 samples")
        return cfg

    def caption_spec(self, cfg: Config, s3) -> image_data.CaptionSpec:
        pformer = storage.join(cfg.init_from.pformer, "pformer") if cfg.init_from.pformer else None
        return image_data.CaptionSpec(qformer=cfg.model.qformer, pformer=pformer, max_txt_len=cfg.data.max_txt_len,
                                      max_chars=cfg.data.max_chars, caption_style=cfg.data.caption_style,
                                      max_words=cfg.data.max_words)

    def build_model(self, cfg: Config, s3: storage.S3Options | None = None):
        from app.models.blip2 import QFormerPretrain, Stage1Weights
        from app.models.qformer import QFormer

        vision = self.vision(cfg, s3)
        qformer, tokenizer = QFormer.from_bert(
            storage.local_model(cfg.model.qformer, s3), num_query_tokens=cfg.model.num_query_tokens,
            encoder_hidden_size=vision.width, llm_dim=llm_embed_dim(storage.local_model(cfg.model.llm, s3)),
            cross_attention_frequency=cfg.model.cross_attention_freq, contrastive_dim=cfg.model.contrastive_dim,
            temp_init=cfg.model.temp_init, dropout=cfg.model.dropout, num_frames=cfg.data.num_frames or 0,
            frame_pooling=cfg.model.frame_pooling, ln_vision=cfg.model.train_ln_vision)
        weights = Stage1Weights(itc=cfg.loss.itc_weight, itm=cfg.loss.itm_weight, itg=cfg.loss.itg_weight,
                                align=cfg.loss.align_weight_for(self.name), label_smoothing=cfg.loss.label_smoothing,
                                gather_with_grad=cfg.loss.gather_with_grad,
                                same_image_positives=cfg.loss.itc_same_image_positives)
        model = QFormerPretrain(vision, qformer, self.pformer(cfg, s3), weights)
        model.qformer_tokenizer = tokenizer
        return model

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["qformer_mask"].sum()

    def manifest(self, cfg: Config) -> dict[str, Any]:
        return {"stage": self.name, "frozen": {"vision": cfg.model.vision, "pformer": cfg.init_from.pformer,
                                               "llm": cfg.model.llm},
                "qformer_init": cfg.model.qformer, "num_query_tokens": cfg.model.num_query_tokens,
                "num_frames": cfg.data.num_frames, "train_features": cfg.data.train_features,
                "align_weight": cfg.loss.align_weight_for(self.name), "ln_vision": cfg.model.train_ln_vision}


class LLMStage(ImageTextStage):
    """Stage 2: Q-Former -> llm_proj -> frozen LLM (LM or prefix-LM loss) plus the P-Former alignment loss."""

    name = "llm"
    loss_keys = ("lm_loss", "align_loss", "align_mse")

    def validate(self, cfg: Config, s3: storage.S3Options) -> Config:
        self._check_data(cfg, s3)
        cfg = cfg.model_copy(deep=True)
        if not cfg.init_from.qformer:
            raise ConfigError("init_from.qformer: stage 'llm' starts from a stage-1 checkpoint; set it to the "
                              "checkpoint (or run folder) of jobs.pretrain_qformer")
        cfg.init_from.qformer = resolve_checkpoint("init_from.qformer", cfg.init_from.qformer, s3)
        manifest = checkpoint_manifest("init_from.qformer", cfg.init_from.qformer, "qformer", s3)
        frozen = manifest.get("frozen", {})
        if frozen.get("vision") and frozen["vision"] != cfg.model.vision:
            raise ConfigError(f"model.vision is {cfg.model.vision}, but the stage-1 checkpoint "
                              f"{cfg.init_from.qformer} was trained on {frozen['vision']}")
        heads = read_json(storage.join(cfg.init_from.qformer, "qformer", QFORMER_HEADS_FILE), s3)
        if heads["num_query_tokens"] != cfg.model.num_query_tokens:
            raise ConfigError(f"model.num_query_tokens is {cfg.model.num_query_tokens}, but the stage-1 Q-Former has "
                              f"{heads['num_query_tokens']} queries")
        trained_frames, wanted_frames = heads.get("num_frames", 0), cfg.data.num_frames or 0
        if trained_frames != wanted_frames:
            what = {0: "images"}.get(trained_frames, f"clips of {trained_frames} frames")
            raise ConfigError(f"data.num_frames is {cfg.data.num_frames}, but the stage-1 Q-Former was trained on {what}: "
                              f"stage 2 samples frames as stage 1 did (set data.num_frames={trained_frames or 'null'})")
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
        cfg.loss.align_weight = cfg.loss.align_weight_for(self.name)
        self._check_cache(cfg, s3)
        return cfg

    def caption_spec(self, cfg: Config, s3) -> image_data.CaptionSpec:
        pformer = storage.join(cfg.init_from.pformer, "pformer") if cfg.init_from.pformer else None
        return image_data.CaptionSpec(pformer=pformer, llm=cfg.model.llm,
                                      llm_is_encoder_decoder=llm_is_encoder_decoder(storage.local_model(cfg.model.llm, s3)),
                                      prompt=cfg.model.prompt, max_txt_len=cfg.data.max_txt_len,
                                      max_chars=cfg.data.max_chars, caption_style=cfg.data.caption_style,
                                      max_words=cfg.data.max_words)

    def build_model(self, cfg: Config, s3: storage.S3Options | None = None):
        from transformers import AutoTokenizer

        from app.models.blip2 import LLMPretrain, Stage2Weights
        from app.models.qformer import QFormer

        directory = local_checkpoint(cfg.init_from.qformer, "qformer", s3)
        check_stage(directory, "qformer", role="init_from.qformer")
        qformer = QFormer.from_architecture(Path(directory) / "qformer", dropout=cfg.model.dropout)
        load_submodule(qformer, directory, "qformer")
        llm_path = storage.local_model(cfg.model.llm, s3)
        llm = FrozenLLM.from_pretrained(llm_path, dtype=resolve_dtype(cfg.model.llm_dtype, cfg.scaling.use_gpu))
        prompt_length = 0 if llm.is_encoder_decoder else image_data.prompt_length(llm_path, cfg.model.prompt)
        weights = Stage2Weights(lm=cfg.loss.lm_weight, align=cfg.loss.align_weight_for(self.name))
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
        return {"stage": self.name, "frozen": {"vision": cfg.model.vision, "pformer": cfg.init_from.pformer,
                                               "llm": cfg.model.llm},
                "init_from": {"qformer": cfg.init_from.qformer}, "num_query_tokens": cfg.model.num_query_tokens,
                "num_frames": cfg.data.num_frames, "train_features": cfg.data.train_features,
                "align_weight": cfg.loss.align_weight_for(self.name), "prompt": cfg.model.prompt,
                "ln_vision": cfg.model.train_ln_vision}


STAGE_NUMBER = {"pformer": 0, "qformer": 1, "llm": 2}
STAGES = {"pformer": PFormerStage, "qformer": QFormerStage, "llm": LLMStage}


def get_stage(name: str):
    if name not in STAGES:
        raise ConfigError(f"stage: '{name}' is not implemented (available: {sorted(STAGES)})")
    return STAGES[name]()
