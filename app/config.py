"""Typed run configuration: defaults, YAML loading, dotted overrides and validation.

Defaults are the paper's real run (P-Former stage 0 with bert-base-uncased and OPT-2.7B on 8 GPUs); YAML files
hold only deviations. Every problem (unknown key, wrong type, impossible value, missing path) raises
`ConfigError` with a message that names the key, before any Ray resource is used."""

from __future__ import annotations

import logging
import os
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

from app.overrides import ConfigError, _format_validation_error, _suggest, flatten, parse_override, read_yaml_mapping

__all__ = ["Config", "ConfigError", "build_config", "flatten", "load_config", "moved_key", "parse_override",
           "read_yaml_mapping", "set_dotted"]

logger = logging.getLogger(__name__)

STAGES = ("pformer", "qformer", "llm")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = Field("pformer-stage0", min_length=1, description="Run name; relaunching a name resumes it.")
    storage_path: str = Field("./checkpoints", min_length=1, description="Local dir or s3:// URI for checkpoints.")
    seed: int = 42


class StorageSection(_Section):  # no credentials here: they come from the AWS environment or instance profile
    s3_endpoint: Optional[str] = Field(None, description="S3 endpoint URL (default: AWS_ENDPOINT_URL[_S3] or AWS).")
    s3_region: Optional[str] = Field(None, description="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION).")
    s3_max_attempts: int = Field(11, ge=1, description="Attempts per S3 request (waits 25 ms x 2^k: 11 ~ 51 s).")


class MlflowSection(_Section):
    tracking_uri: str = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db",
                              min_length=1, description="Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.")
    experiment: str = Field("pformer", min_length=1)
    outage_wait_s: float = Field(300, ge=0, description="End of training: seconds to retry held reports (tracking outage).")


class ScalingSection(_Section):
    num_workers: int = Field(8, ge=0, description="Ray Train workers; 0 = Ray Train's local mode: the loop runs in the "
                                                  "launching process (no worker actors, no restarts; README).")
    use_gpu: bool = True
    cpus_per_worker: float = Field(1.0, gt=0)
    worker_resources: dict[str, PositiveFloat] = Field(default_factory=dict, description="Custom resources per worker "
                                                       "(not CPU/GPU), e.g. a node type's own, to train on that type.")
    local_num_cpus: int = Field(8, ge=1, description="Logical CPUs of a Ray instance started locally (more than the "
                                                     "cores on purpose: the trainer must not starve Ray Data).")
    data_cpus: Optional[float] = Field(None, gt=0, description="CPU slots of Ray Data's training stream; None: no limit "
                                       "on a cluster, the cores the trainer leaves on one machine (README).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers: PACK fills a node first; STRICT_SPREAD one per node.")

    @property
    def local_mode(self) -> bool:
        return self.num_workers == 0

    @property
    def world_size(self) -> int:
        """Training processes: the workers, or the launching process itself in local mode."""
        return max(1, self.num_workers)


class TrainSection(_Section):
    # ~5 epochs of 12M captions at a global batch of 1024 (8 GPUs x 128).
    max_steps: int = Field(60_000, gt=0)
    epochs: int = Field(5, gt=0, description="Upper bound on passes over the data; max_steps usually ends first.")
    batch_size_per_worker: int = Field(128, gt=0)
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(2000, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip_norm: Optional[float] = Field(None, gt=0, description="None = no clipping (as the reference).")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Autocast dtype on GPU; CPU runs fp32.")
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches per optimiser update (DDP all-reduces on the last only): global batch = "
                             "workers x batch_size_per_worker x grad_accum_steps; max_steps counts updates. Batch-coupled "
                             "terms (stage-0 contrastive, stage-1 ITC/ITM negatives) see one micro-batch (README).")
    compile: bool = Field(False, description="torch.compile the trainable modules (in place; checkpoints unchanged).")
    fused_adamw: bool = Field(True, description="AdamW's fused kernel when training on CUDA (same update, fewer launches).")
    tf32: bool = Field(True, description="TF32 for float32 matmuls on Ampere or newer GPUs (the fp32 Q-Former's "
                                         "matmuls outside autocast); no effect on CPU.")
    log_every_steps: int = Field(50, gt=0)
    checkpoint_every_steps: int = Field(2000, gt=0)
    num_checkpoints_to_keep: int = Field(2, gt=0)
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1 = forever).")
    lr_schedule: Literal["cosine_per_step", "cosine_per_epoch"] = Field(
        "cosine_per_step",
        description="After the linear warmup, cosine decay to min_lr: every step over max_steps (cosine_per_step), or "
                    "once per epoch over train.epochs as LAVIS's linear_warmup_cosine_lr does (cosine_per_epoch: warmup "
                    "within the first epoch, then lr = min_lr + (lr - min_lr)(1 + cos(pi epoch / epochs)) / 2).")

    @model_validator(mode="after")
    def _check_lrs(self) -> "TrainSection":
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        return self


class DataSection(_Section):
    text: Optional[str] = Field(None, description="Text corpus: local file, folder, glob, or s3:// prefix.")
    text_format: Literal["auto", "txt", "tsv", "csv", "jsonl", "parquet"] = "auto"
    text_column: str = Field("caption", min_length=1, description="Column/field holding the text (tsv/csv/jsonl/parquet).")
    max_chars: int = Field(1000, gt=0, description="Cleaned texts are cut to this many characters.")
    caption_style: Literal["blip", "raw"] = Field(
        "blip", description="Caption normalisation before tokenisation (stage-0 text, stage-1/2 captions): blip = BLIP's "
                            "pre_caption (lowercase, .!\"()*#:;~ to spaces, spaces collapsed, at most data.max_words "
                            "words); raw = the text as written, whitespace collapsed.")
    max_words: int = Field(50, gt=0, description="caption_style=blip: captions are cut to this many words.")
    max_txt_len: int = Field(32, gt=1, description="Token budget per caption for every tokenizer.")
    shuffle_buffer_rows: int = Field(10_000, ge=0, description="Local shuffle buffer of the training iterator.")
    prefetch_batches: int = Field(4, ge=1)
    preserve_order: bool = Field(
        True, description="Ray Data hands the trainer its rows in the order the (seeded) file order and the read "
                          "give them, not in the order parallel read and preprocessing tasks finish: with one worker "
                          "(or local mode) a run repeats with its seed; with several workers it has no effect "
                          "(streaming_split's order cannot repeat). False = whichever block is ready first "
                          "(no head-of-line wait; runs then differ in the order of their batches).")
    # image-text shards (stages 1 and 2)
    train: Optional[str] = Field(None, description="Image-text shards (WebDataset .tar or Parquet): folder, glob, or s3:// prefix.")
    val: Optional[str] = Field(None, description="Validation shards; their losses are logged at every checkpoint.")
    train_features: Optional[str] = Field(
        None, description="Stages 1-2: a frozen-feature cache written by jobs.cache_features (folder or s3:// prefix), "
                          "read in place of data.train; refused when its manifest does not match this run's models.")
    train_pictures: Optional[int] = Field(
        None, gt=0, description="Stages 1-2: train on the first N pictures of data.train only (shard files by name, "
                                "samples in file order; all captions of each), e.g. to measure how the result "
                                "scales with image-text pairs; None = every picture.")
    image_format: Literal["auto", "webdataset", "parquet"] = "auto"
    image_column: str = Field("image", min_length=1, description="Parquet column with the encoded image bytes.")
    caption_column: str = Field("caption", min_length=1, description="Parquet column / WebDataset .json field with the caption.")
    image_size: Optional[int] = Field(None, gt=0, description="Input resolution; None = the vision tower's image_size.")
    min_crop_scale: float = Field(0.5, gt=0, le=1, description="Training random-resized-crop area range [min_crop_scale, 1].")
    horizontal_flip: bool = Field(
        True, description="Training: flip half the images left-right (off when captions say left or right).")
    max_skipped_fraction: float = Field(
        0.1, ge=0, le=1,
        description="Stages 1-2: the run fails (naming shard and key) when more samples than this are unusable.")
    val_max_batches: int = Field(50, gt=0, description="Validation batches per worker at each evaluation.")


class ModelSection(_Section):
    pformer: str = Field("bert-base-uncased", description="HF id or path of the P-Former's BERT encoder.")
    llm: str = Field("facebook/opt-2.7b", description="HF id or path of the frozen LLM (OPT-style or T5-style).")
    num_query_tokens: int = Field(32, gt=0, description="Q: prompt length, independent of data.max_txt_len.")
    llm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Frozen LLM weights dtype; auto = bfloat16 on GPU, float32 on CPU.")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel of every transformers model in training (frozen LLM, vision tower, "
                            "P-Former, Q-Former): sdpa = torch's scaled_dot_product_attention (fused, less memory), "
                            "eager = the written-out softmax(QK^T)V of the reference's transformers.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute the trained BERT's layer activations in the backward pass (the Q-Former in stages "
                           "1-2, the P-Former in stage 0): less activation memory for about a third more compute.")
    contrastive_dim: int = Field(256, gt=0)
    temp_init: float = Field(0.07, gt=0)
    vision: str = Field("Salesforce/blip2-opt-2.7b",
                        description="HF id or path of the frozen image encoder (a vision tower, or a model holding one).")
    vision_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    qformer: str = Field("bert-base-uncased", description="HF id or path of the BERT that initialises the Q-Former.")
    cross_attention_freq: int = Field(2, gt=0, description="Q-Former cross-attention every N layers.")
    prompt: str = Field("", description="Stage 2: text prompt after the soft prompt (BLIP-2's `prompt`).")
    num_frames: Optional[int] = Field(
        None, gt=0, le=64, description="Video: frames sampled per clip (one per equal segment) and the Q-Former's "
                                       "temporal positions; None = an image model. In a video run an image is a "
                                       "one-frame clip.")
    frame_pooling: Literal["concat", "mean"] = Field(
        "concat", description="Video (model.num_frames): the Q-Former cross-attends to every frame's tokens (concat) "
                              "or to their mean over frames (mean), after a learned temporal position embedding.")
    train_ln_vision: bool = Field(
        True, description="Stages 1-2: the image tokens are taken before the tower's final LayerNorm and go through a "
                          "new LayerNorm (BLIP-2's ln_vision) trained with the Q-Former; false = the tower's own final "
                          "LayerNorm, frozen (for Salesforce/blip2-* towers that is BLIP-2's trained ln_vision).")
    llm_dropout_in_training: bool = Field(
        True, description="Stages 0 and 2: the frozen LLM runs in train mode (its own dropout active) during training, "
                          "as in the reference; it is always in eval mode for validation, evaluation and generation.")
    dropout: Optional[float] = Field(
        None, ge=0, lt=1, description="Dropout of the trained BERT layers (P-Former in stage 0, Q-Former in stages "
                                      "1-2); unset = the checkpoint's own (0.1 for BERT). Tiny models learn better with 0.")


class LossSection(_Section):
    lm_weight: float = Field(1.0, ge=0)
    contrastive_weight: float = Field(1.0, ge=0)
    vocab_weight: Optional[float] = Field(
        None, ge=0, description="None = as the reference: 1 for decoder-only LLMs, 0 for encoder-decoder ones.")
    contrastive_views: Literal[1, 2] = Field(1, description="1 = reference (one forward), 2 = SimCSE-style views.")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mask_prob: float = Field(0.25, ge=0, lt=1, description="P-Former input masking (decoder-only LLMs only).")
    align_weight: Optional[float] = Field(
        None, ge=0, description="P-Former alignment weight; None = the paper's (10 in stage 1, 100 in stage 2); 0 = BLIP-2.")
    itc_weight: float = Field(1.0, ge=0)
    itm_weight: float = Field(1.0, ge=0)
    itg_weight: float = Field(1.0, ge=0)
    gather_with_grad: bool = Field(
        False, description="Stage-0 contrastive and stage-1 ITC: false = the gathered side of the similarity matrix "
                           "carries no gradient (the reference's torch.distributed.all_gather, at every world size); "
                           "true = gradients flow through the gathered features too.")
    itc_same_image_positives: bool = Field(
        False, description="Stage 1: captions of the same image (image_id in the shards) are ITC positives (targets "
                           "spread over them) and never drawn as ITM negatives; false = the reference (BLIText).")



PAPER_ALIGN_WEIGHT = {"qformer": 10.0, "llm": 100.0}


class InitFromSection(_Section):
    pformer: Optional[str] = Field(
        None, description="Stage-0 checkpoint (or its run folder: the latest checkpoint) giving the frozen P-Former.")
    qformer: Optional[str] = Field(
        None, description="Stage-1 checkpoint (or its run folder) that initialises stage 2's Q-Former and llm_proj.")


class CacheSection(_Section):
    """jobs.cache_features: what to precompute from data.train with the run's frozen models."""

    out: Optional[str] = Field(None, description="Where the cache is written: folder or s3:// prefix (required).")
    kind: Literal["features", "prompts"] = Field(
        "features", description="features: frozen image features + P-Former vectors (eval transforms: no augmentation); "
                                "prompts: the media bytes + P-Former vectors (images still decoded and augmented).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Stored dtype of the tensors.")
    store: Literal["sentence", "prompts"] = Field(
        "sentence", description="P-Former output stored: its [CLS] sentence vector (the frozen heads make the prompts "
                                "in the training step) or the Q x D_llm prompts themselves (Q x D_llm / H times larger).")
    batch_size: int = Field(64, gt=0, description="Samples per forward pass of the frozen encoders.")
    num_actors: Optional[int] = Field(
        None, gt=0, description="Encoder replicas (Ray actors); default one per GPU, else one per 4 CPUs (at most 4).")
    rows_per_block: int = Field(64, gt=0, description="Samples per Ray Data block and per Parquet part file.")


class Config(_Section):
    stage: Literal["pformer", "qformer", "llm"] = "pformer"
    run: RunSection = RunSection()
    storage: StorageSection = StorageSection()
    mlflow: MlflowSection = Field(default_factory=MlflowSection)  # (a fresh default reads $MLFLOW_TRACKING_URI)
    scaling: ScalingSection = ScalingSection()
    train: TrainSection = TrainSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    loss: LossSection = LossSection()
    init_from: InitFromSection = InitFromSection()
    cache: CacheSection = CacheSection()

    @model_validator(mode="after")
    def _resolve_defaults(self) -> "Config":
        """Resolved here once: loss.align_weight None is the paper's weight for the stage (10 / 100; stage 0: 0)."""
        if self.loss.align_weight is None:
            self.loss.align_weight = PAPER_ALIGN_WEIGHT.get(self.stage, 0.0)
        if self.scaling.local_mode and self.train.max_failures != 0:
            raise ValueError(f"train.max_failures={self.train.max_failures}: Ray Train's local mode "
                             "(scaling.num_workers=0) restarts nothing; set it to 0, or train with workers")
        if {"CPU", "GPU"} & set(self.scaling.worker_resources):
            raise ValueError("scaling.worker_resources: set CPU and GPU with scaling.cpus_per_worker / scaling.use_gpu")
        return self

    def flat(self) -> dict[str, Any]:  # the resolved config as {dotted.key: value} (MLflow params, summaries)
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# loading


def _check_keys(raw: Any, model: type[BaseModel], prefix: str = "") -> None:
    """Reject unknown keys with the dotted name and a suggestion, before pydantic sees them."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'}: expected a mapping of keys, got "
                          f"{type(raw).__name__} ({raw!r})")
    fields = model.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted, [f'{prefix}{name}' for name in fields])}")
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, dotted + ".")


def set_dotted(tree: dict[str, Any], key: str, value: Any, model: type[BaseModel] | None = None) -> None:
    """Set `a.b.c` in a raw mapping, each part checked against the sections of `model` (default Config)."""
    parts = key.split(".")
    node = tree
    model = model or Config
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        fields = model.model_fields
        if part not in fields:
            known = [".".join(parts[:depth] + [name]) for name in fields]
            raise ConfigError(f"unknown config key '{key}'{_suggest(dotted, known)}")
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth == len(parts) - 1:
            if is_section:
                raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. '{key}.{next(iter(annotation.model_fields))}=...'")
            node[part] = value
            return
        if not is_section:
            raise ConfigError(f"unknown config key '{key}': '{dotted}' is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{dotted}' must be a mapping")
        model = annotation


# Keys that moved (old -> new; old configs and checkpoints still load, with a message): the frame count is the Q-Former's.
MOVED_KEYS = {"data.num_frames": "model.num_frames"}


def moved_key(key: str, prefix: str = "") -> str:
    """A dotted override key under its current name (with a deprecation message when it moved)."""
    if key in MOVED_KEYS:
        logger.warning("%s%s is deprecated: it is %s%s now", prefix, key, prefix, MOVED_KEYS[key])
    return MOVED_KEYS.get(key, key)


def _moved(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` with every old key of MOVED_KEYS under its new name (a ConfigError when both are set apart)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section, target = tree.get(old_section), tree.setdefault(new_section, {})
        if not (isinstance(section, dict) and isinstance(target, dict)):
            continue  # _check_keys names a malformed section
        value = section.pop(old_key, None)
        if value is None:  # unset (as every config written before the move has it): nothing to carry
            continue
        if new_key in target and target[new_key] != value:
            raise ConfigError(f"{old} ({value}) and {new} ({target[new_key]}) disagree; {old} is the old name of "
                              f"{new}: keep only {new}")
        logger.warning("%s is deprecated: it is %s now (read as %s=%s)", old, new, new, value)
        target[new_key] = value
    return tree


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    """Validate a raw mapping plus dotted overrides into a `Config`."""
    tree: dict[str, Any] = _moved(dict(raw or {}))
    _check_keys(tree, Config)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(tree, moved_key(key), value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Load YAML (deviations from the defaults) and apply `dotted.key=value` overrides."""
    return build_config(read_yaml_mapping(path) if path is not None else {}, overrides)

