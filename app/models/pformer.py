"""P-Former: a BERT sentence encoder whose [CLS] vector is expanded into Q soft prompts for a frozen LLM.

    [CLS] (B, H) --cls_proj--> (B, Q*H) --reshape--> (B, Q, H) --pooler(tanh)--> --llm_proj--> (B, Q, D_llm)

plus the stage-0 contrastive head `text_proj` (H -> C, L2-normalised) and a learnable temperature.
"""

from __future__ import annotations

from typing import Optional

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from app.models.frozen import freeze
from app.train.checkpoint import check_stage, load_submodule, local_checkpoint

HEADS_FILE = "pformer_heads.json"


@dataclass
class PFormerOutput:
    prompts: torch.Tensor   # (B, Q, D_llm) predicted soft prompt
    sentence: torch.Tensor  # (B, H) [CLS] output
    features: torch.Tensor  # (B, C) normalised contrastive features
    temp: torch.Tensor      # () contrastive temperature, clamped


class PFormer(nn.Module):
    def __init__(self, bert: BertModel, num_query_tokens: int, llm_dim: int,
                 contrastive_dim: int = 256, temp_init: float = 0.07):
        super().__init__()
        hidden = bert.config.hidden_size
        self.num_query_tokens = num_query_tokens
        self.llm_dim = llm_dim
        self.bert = bert
        self.cls_proj = nn.Linear(hidden, num_query_tokens * hidden)
        self.pooler = nn.Linear(hidden, hidden)
        self.llm_proj = nn.Linear(hidden, llm_dim)
        self.text_proj = nn.Linear(hidden, contrastive_dim)
        self.temp = nn.Parameter(torch.tensor(float(temp_init)))

    @classmethod
    def from_pretrained(cls, name_or_path: str, dropout: Optional[float] = None, **heads) -> "PFormer":
        rates = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        return cls(BertModel.from_pretrained(name_or_path, add_pooling_layer=False, **rates), **heads)

    @property
    def heads_config(self) -> dict:
        return {"num_query_tokens": self.num_query_tokens, "llm_dim": self.llm_dim,
                "contrastive_dim": self.text_proj.out_features}

    def save_architecture(self, directory: str | Path) -> None:
        """Everything needed to rebuild the module without its original HF id (weights go elsewhere)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.bert.config.save_pretrained(directory)
        (directory / HEADS_FILE).write_text(json.dumps(self.heads_config))

    @classmethod
    def from_architecture(cls, directory: str | Path) -> "PFormer":
        directory = Path(directory)
        heads = json.loads((directory / HEADS_FILE).read_text())
        bert = BertModel(BertConfig.from_pretrained(directory), add_pooling_layer=False)
        return cls(bert, **heads)

    @classmethod
    def load_frozen(cls, uri: str, s3=None) -> "PFormer":
        """The stage-0 P-Former of a checkpoint (local or s3://), strictly (every weight present and
        matching), frozen."""
        directory = local_checkpoint(uri, "pformer", s3)
        check_stage(directory, "pformer", role="init_from.pformer")
        pformer = cls.from_architecture(Path(directory) / "pformer")
        load_submodule(pformer, directory, "pformer")
        return freeze(pformer)

    def prompts_from_sentence(self, sentence: torch.Tensor) -> torch.Tensor:
        batch, hidden = sentence.shape
        expanded = self.cls_proj(sentence).view(batch, self.num_query_tokens, hidden)  # (B, Q, H)
        return self.llm_proj(torch.tanh(self.pooler(expanded)))  # (B, Q, D_llm)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PFormerOutput:
        sentence = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]  # (B, H)
        features = F.normalize(self.text_proj(sentence), dim=-1)  # (B, C)
        temp = self.temp.clamp(0.001, 0.5)
        return PFormerOutput(self.prompts_from_sentence(sentence), sentence, features, temp)
