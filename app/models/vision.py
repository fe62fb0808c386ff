"""The frozen image encoder: any Hugging Face vision tower, with or without its final LayerNorm over the tokens.

`model.vision` names a vision tower (`Blip2VisionModel`, `CLIPVisionModel`, `SiglipVisionModel`, ...)
or a model that holds one (the full `Salesforce/blip2-opt-2.7b` or `openai/clip-vit-large-patch14`:
the vision part is loaded, the rest is not). With `final_layernorm=True` (model.train_ln_vision=false)
the tokens leave through the tower's own final LayerNorm, frozen: its post-LayerNorm where the tower
applies it to every token (Blip2VisionModel), its `post_layernorm` where it keeps it for the pooled
output only (CLIP, SigLIP), or a parameter-free LayerNorm otherwise. BLIP-2 itself trains a fresh `ln_vision`
with the Q-Former (only the ViT is frozen): with `final_layernorm=False` (the default of the stages) the
encoder returns the tokens before that final LayerNorm (Blip2VisionModel's `post_layernorm` is dropped
from the tower) and the Q-Former applies its own trainable `ln_vision` (`app.models.qformer`). The
encoder takes uint8 HWC pixels and normalises them with the mean/std of the tower's image processor.
Everything here is frozen and stays in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from app import storage
from app.models.frozen import freeze

# Composite configs whose vision part we load: model_type -> (attribute of the vision config, class name).
VISION_CLASSES = {
    "blip_2_vision_model": "Blip2VisionModel",
    "blip-2": "Blip2VisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "clip": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip": "SiglipVisionModel",
    "instructblip": "InstructBlipVisionModel",
    "instructblip_vision_model": "InstructBlipVisionModel",
}
# OpenAI CLIP statistics (BLIP-2's processor uses them too); used when a folder has no processor config.
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


def vision_config(name_or_path: str):
    """The vision tower's config, from a tower or from a model that holds one."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    return getattr(config, "vision_config", None) or config


def image_size_for(cfg, s3=None) -> int:
    """The square size a run resizes images to: data.image_size, else the vision tower's own."""
    return cfg.data.image_size or int(vision_config(storage.local_model(cfg.model.vision, s3)).image_size)


def vision_class(name_or_path: str):
    import transformers
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    if model_type not in VISION_CLASSES:
        raise ValueError(f"model.vision: {name_or_path} is a '{model_type}' model; supported vision towers: "
                         f"{sorted(set(VISION_CLASSES.values()))}")
    return getattr(transformers, VISION_CLASSES[model_type])


def _vision_weights(name_or_path: str, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names start with `prefix`, reading only the shards that hold them."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(name_or_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = sorted({f for key, f in weight_map.items() if key.startswith(prefix)})
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(cached_file(name_or_path, name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    state[key] = f.get_tensor(key)
    return state


def load_tower(name_or_path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The vision tower alone. From a tower checkpoint through `from_pretrained`; from a full model
    (BLIP-2, CLIP, ...) by building the tower from its vision config and loading, strictly, the weights
    under `vision_model.` (only the shards that hold them are read: no 2.7B-parameter LLM to load)."""
    from transformers import AutoConfig

    tower_class = vision_class(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    if getattr(config, "vision_config", None) is None:
        return tower_class.from_pretrained(name_or_path, dtype=dtype)
    tower = tower_class(config.vision_config)
    own = set(tower.state_dict())
    state = _vision_weights(name_or_path, "vision_model.")
    if not own <= set(state):  # towers whose own names drop the prefix (Blip2VisionModel)
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    missing, unexpected = own - set(state), set(state) - own
    if missing:
        raise ValueError(f"model.vision: {name_or_path} has no weights for {sorted(missing)[:5]} "
                         f"({len(missing)} missing) of its {tower_class.__name__}")
    tower.load_state_dict({k: v for k, v in state.items() if k not in unexpected}, strict=True)
    return tower.to(dtype)


def normalisation(name_or_path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the folder's image-processor config; CLIP statistics when there is none."""
    path = Path(name_or_path) / "preprocessor_config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return tuple(data.get("image_mean", DEFAULT_MEAN)), tuple(data.get("image_std", DEFAULT_STD))
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name_or_path)
        return tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError):
        return DEFAULT_MEAN, DEFAULT_STD


class VisionEncoder(nn.Module):
    """uint8 pixels (B, S, S, 3) -> image tokens (B, N, D); clips (B, T, S, S, 3) -> (B, T, N, D), every
    frame through the same tower. Frozen."""

    def __init__(self, tower: nn.Module, mean, std, layernorm: Optional[nn.Module] = None,
                 final_layernorm: bool = True):
        super().__init__()
        self.tower = tower
        self.layernorm = layernorm if layernorm is not None else nn.Identity()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.final_layernorm = final_layernorm  # False: tokens before the final LayerNorm (see from_pretrained)
        freeze(self)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32,
                        final_layernorm: bool = True) -> "VisionEncoder":
        """final_layernorm=False: the tokens before the tower's final LayerNorm (for a trainable ln_vision)."""
        mean, std = normalisation(name_or_path)
        return cls.from_tower(load_tower(name_or_path, dtype), mean, std, final_layernorm)

    @classmethod
    def from_tower(cls, tower: nn.Module, mean, std, final_layernorm: bool = True) -> "VisionEncoder":
        from transformers import Blip2VisionModel, InstructBlipVisionModel

        applies_to_every_token = isinstance(tower, (Blip2VisionModel, InstructBlipVisionModel))
        if not final_layernorm:
            if applies_to_every_token:
                tower.post_layernorm = nn.Identity()  # applied to every token inside the tower: taken out
            return cls(tower, mean, std, final_layernorm=False)
        if applies_to_every_token:
            layernorm = None  # their last_hidden_state already went through post_layernorm (BLIP-2's ln_vision)
        else:
            inner = getattr(tower, "vision_model", tower)
            layernorm = getattr(inner, "post_layernorm", None)
            if layernorm is None:
                layernorm = nn.LayerNorm(tower.config.hidden_size, elementwise_affine=False)
        return cls(tower, mean, std, layernorm)

    @property
    def width(self) -> int:
        return self.tower.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.tower.config.image_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() == 5:  # clips: frames are images
            batch, frames = pixels.shape[:2]
            tokens = self.forward(pixels.flatten(0, 1))
            return tokens.view(batch, frames, *tokens.shape[1:])  # (B, T, N, D)
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S)
        x = ((x - self.mean) / self.std).to(self.dtype)
        return self.layernorm(self.tower(pixel_values=x).last_hidden_state)  # (B, N, D)
