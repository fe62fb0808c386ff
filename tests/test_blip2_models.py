"""Stage-1/2 models on tiny components and real photos: frozen parts stay frozen (no gradient, same
weights, eval mode, deterministic P-Former targets), the Q-Former is built from BERT weights, its masks
hold, the vision tower loads from full checkpoints, and checkpoint loading is strict."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from app.data.captions import CaptionSpec
from app.data.samples import preprocess_image_batch
from app.data.media import MediaSpec
from app.data.sources import SCHEMA, iter_tar_samples
from app.models.composites import LLMPretrain, QFormerPretrain, Stage1Weights, Stage2Weights
from app.models.llm import FrozenLLM
from app.models.pformer import PFormer
from app.models.qformer import QFormer, multimodal_causal_mask
from app.models.vision import VisionEncoder
from app.data.captions import trim_padding
from app.train.checkpoint import CheckpointError, TrainerState, load_submodule, save_checkpoint
from app.train.optim import build_optimizer
from app.losses import stage_losses

from conftest import FLICKR, photo, write_tar

Q = 4


def photo_batch(tmp_path, tiny_models, kind="opt", count=6):
    captions = json.loads((FLICKR / "captions.json").read_text())
    names = sorted(captions)[:count]
    path = write_tar(tmp_path / "b.tar", [(f"k{i}", {"jpg": photo(i), "txt": captions[n][0].encode()})
                                          for i, n in enumerate(names)])
    with open(path, "rb") as f:
        rows = list(iter_tar_samples(f, path))
    spec = CaptionSpec(qformer=tiny_models["bert"], pformer=tiny_models["bert"], llm=tiny_models[kind],
                       llm_is_encoder_decoder=kind == "t5", max_txt_len=16)
    out = preprocess_image_batch(pa.Table.from_pylist(rows, schema=SCHEMA), media=MediaSpec(size=32, train=True), captions=spec)
    return trim_padding({k: torch.from_numpy(v).long() if k != "pixels" else torch.from_numpy(v) for k, v in out.items()})


def parts(tiny_models, tiny_vision, kind="opt"):
    torch.manual_seed(0)
    vision = VisionEncoder.from_pretrained(tiny_vision["blip2"])
    llm = FrozenLLM.from_pretrained(tiny_models[kind])
    pformer = PFormer.from_pretrained(tiny_models["bert"], num_query_tokens=Q, llm_dim=llm.embed_dim, contrastive_dim=16)
    qformer, tokenizer = QFormer.from_bert(tiny_models["bert"], num_query_tokens=Q, encoder_hidden_size=vision.width,
                                           llm_dim=llm.embed_dim, contrastive_dim=16)
    return vision, qformer, llm, pformer


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage, kind", [("qformer", "opt"), ("llm", "opt"), ("llm", "t5")])
def test_frozen_parts_stay_frozen_while_the_qformer_learns(stage, kind, tiny_models, tiny_vision, tmp_path):
    vision, qformer, llm, pformer = parts(tiny_models, tiny_vision, kind)
    if stage == "qformer":
        model = QFormerPretrain(vision, qformer, pformer, Stage1Weights(align=10))
        frozen = {"vision": vision, "pformer": pformer}
    else:
        model = LLMPretrain(vision, qformer, llm, pformer, Stage2Weights(align=100))
        frozen = {"vision": vision, "pformer": pformer, "llm": llm}
    before = {name: snapshot(m) for name, m in frozen.items()}
    qformer_before = snapshot(qformer)
    model.train()
    assert model.qformer.training
    for name, module in frozen.items():
        # The tower and the P-Former stay in eval mode; the LLM follows training (its dropout, as the reference).
        assert all(m.training for m in module.modules()) if name == "llm" else \
            not any(m.training for m in module.modules()), name
        assert not any(p.requires_grad for p in module.parameters()), name
    batch = photo_batch(tmp_path, tiny_models, kind)
    # The P-Former's targets: no dropout, no masking, no gradient -> identical in two forwards.
    first = model.pformer(batch["pformer_ids"], batch["pformer_mask"]).prompts
    second = model.pformer(batch["pformer_ids"], batch["pformer_mask"]).prompts
    assert torch.equal(first, second) and not first.requires_grad
    optimizer = build_optimizer(model.trainable_parameters(), 1e-3, 0.05, (0.9, 0.999))
    for _ in range(3):
        losses = stage_losses(model, batch)
        losses["loss"].backward()
        for name, module in frozen.items():
            assert all(p.grad is None for p in module.parameters()), name
        optimizer.step()
        optimizer.zero_grad()
    expected = {"itc_loss", "itm_loss", "itg_loss", "align_loss", "align_mse"} if stage == "qformer" else \
        {"lm_loss", "align_loss", "align_mse"}
    assert expected | {"loss"} == set(losses)
    for name, module in frozen.items():
        assert same(before[name], snapshot(module)), name
    assert not same(qformer_before, snapshot(qformer))
    if stage == "llm":  # the text side of the Q-Former is unused in stage 2 and frozen with it
        assert not qformer.embeddings.word_embeddings.weight.requires_grad and qformer.llm_proj.weight.requires_grad


def test_baseline_without_pformer_has_no_alignment_and_freezes_llm_proj(tiny_models, tiny_vision, tmp_path):
    vision, qformer, _, _ = parts(tiny_models, tiny_vision)
    model = QFormerPretrain(vision, qformer, None, Stage1Weights(align=0))
    losses = stage_losses(model, photo_batch(tmp_path, tiny_models))
    assert set(losses) == {"itc_loss", "itm_loss", "itg_loss", "loss"}
    assert not qformer.llm_proj.weight.requires_grad
    assert torch.allclose(losses["loss"], losses["itc_loss"] + losses["itm_loss"] + losses["itg_loss"])


def test_qformer_takes_every_shared_weight_from_bert(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs"])}
    BertTokenizerFast(vocab=vocab).save_pretrained(tmp_path)
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64))
    mlm.save_pretrained(tmp_path)
    qformer, tokenizer = QFormer.from_bert(str(tmp_path), num_query_tokens=Q, encoder_hidden_size=24, llm_dim=40)
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == len(vocab)
    src = mlm.state_dict()
    layer = qformer.bert.encoder.layer
    assert torch.equal(layer[1].attention.attention.query.weight, src["bert.encoder.layer.1.attention.self.query.weight"])
    for ffn in ("intermediate", "intermediate_query"):
        assert torch.equal(getattr(layer[0], ffn).dense.weight, src["bert.encoder.layer.0.intermediate.dense.weight"])
    for ffn in ("output", "output_query"):
        assert torch.equal(getattr(layer[1], ffn).LayerNorm.weight, src["bert.encoder.layer.1.output.LayerNorm.weight"])
    assert torch.equal(qformer.embeddings.word_embeddings.weight[:len(vocab)], src["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(qformer.bert.layernorm.bias, src["bert.embeddings.LayerNorm.bias"])
    assert torch.equal(qformer.lm_transform[0].weight, src["cls.predictions.transform.dense.weight"])
    assert torch.equal(qformer.lm_bias[:len(vocab)], src["cls.predictions.bias"])
    # Cross-attention every other layer, reading the vision width; the LM head is tied to the word embeddings.
    assert layer[0].has_cross_attention and not layer[1].has_cross_attention
    assert layer[0].crossattention.attention.key.weight.shape == (32, 24)
    hidden = torch.randn(2, 3, 32)
    manual = qformer.lm_transform(hidden) @ qformer.embeddings.word_embeddings.weight.t() + qformer.lm_bias
    assert torch.allclose(qformer.lm_logits(hidden), manual, atol=1e-6)
    # model.dropout overrides BERT's 0.1 everywhere (and carries over to stage 2 through the saved architecture);
    # without dropout, a train-mode forward is deterministic.
    assert qformer.config.hidden_dropout_prob == 0.1
    quiet, _ = QFormer.from_bert(str(tmp_path), num_query_tokens=Q, encoder_hidden_size=24, llm_dim=40, dropout=0.0)
    quiet.save_architecture(tmp_path / "arch")
    for model in (quiet, QFormer.from_architecture(tmp_path / "arch")):
        assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.0
        model.train()
        image = torch.randn(2, 5, 24)
        assert torch.equal(model.encode_image(image), model.encode_image(image))
    assert QFormer.from_architecture(tmp_path / "arch", dropout=0.2).config.hidden_dropout_prob == 0.2


def test_itg_mask_keeps_queries_blind_to_text_and_text_causal(tiny_models, tiny_vision):
    _, qformer, _, _ = parts(tiny_models, tiny_vision)
    qformer.eval()
    image = torch.randn(2, 17, 32)
    ids = torch.randint(5, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    out = qformer.encode_joint(ids, multimodal_causal_mask(Q, mask), image)
    changed = ids.clone()
    changed[:, 4:] = 7  # change only the last two text tokens
    out2 = qformer.encode_joint(changed, multimodal_causal_mask(Q, mask), image)
    assert torch.allclose(out[:, :Q], out2[:, :Q], atol=1e-5)  # queries never see text
    assert torch.allclose(out[:, :Q], qformer.encode_image(image), atol=1e-5)  # = the image-only pass
    assert torch.allclose(out[:, Q:Q + 4], out2[:, Q:Q + 4], atol=1e-5)  # earlier text never sees later text
    assert not torch.allclose(out[:, Q + 4:], out2[:, Q + 4:])


def test_vision_encoder_from_full_checkpoints_frozen_and_normalising(tmp_path, tiny_vision):
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              OPTConfig)

    torch.manual_seed(0)
    full = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8, initializer_range=0.02).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, encoder_hidden_size=32).to_dict(),
        text_config=OPTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                              word_embed_proj_dim=32).to_dict(), num_query_tokens=4))
    full.save_pretrained(tmp_path / "blip2")
    encoder = VisionEncoder.from_pretrained(str(tmp_path / "blip2"))
    expected = full.vision_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in encoder.tower.state_dict().items())
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    normalised = (pixels.permute(0, 3, 1, 2).float() / 255 - encoder.mean) / encoder.std
    with torch.no_grad():
        assert torch.allclose(encoder(pixels), full.vision_model(pixel_values=normalised).last_hidden_state, atol=1e-5)
    clip = VisionEncoder.from_pretrained(tiny_vision["clip"])  # CLIP: the tower's post-LayerNorm on every token
    with torch.no_grad():
        tokens = clip(pixels)
    assert tokens.shape == (2, 17, 32)
    assert clip.layernorm is getattr(clip.tower, "vision_model", clip.tower).post_layernorm


def test_loading_the_wrong_checkpoint_into_the_qformer_names_the_problem(tiny_models, tiny_vision, tmp_path):
    vision, qformer, llm, pformer = parts(tiny_models, tiny_vision)

    class Stage0:  # what a stage-0 checkpoint holds: P-Former weights only
        trainable_names = ("pformer",)

    stage0 = Stage0()
    stage0.pformer = pformer
    optimizer = torch.optim.AdamW(pformer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(tmp_path / "s0", model=stage0, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    state=TrainerState(), config_yaml="", manifest={"stage": "pformer"})
    with pytest.raises(CheckpointError, match=r"holds no weights for 'qformer' \(it has: \['pformer'\]\)"):
        load_submodule(qformer, tmp_path / "s0", "qformer")
    other, _ = QFormer.from_bert(tiny_models["bert"], num_query_tokens=Q + 2, encoder_hidden_size=vision.width,
                                 llm_dim=llm.embed_dim, contrastive_dim=16)
    stage1 = Stage0()
    stage1.trainable_names, stage1.qformer = ("qformer",), other
    save_checkpoint(tmp_path / "s1", model=stage1, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    state=TrainerState(), config_yaml="", manifest={"stage": "qformer"})
    with pytest.raises(CheckpointError, match="does not match 'qformer'.*query_tokens"):
        load_submodule(qformer, tmp_path / "s1", "qformer")


def test_stage2_scores_caption_tokens_only(tiny_models, tiny_vision, tmp_path):
    vision, qformer, llm, _ = parts(tiny_models, tiny_vision)
    batch = photo_batch(tmp_path, tiny_models)
    plain = LLMPretrain(vision, qformer, llm, None, Stage2Weights(align=0), prompt_length=0)
    skipped = LLMPretrain(vision, qformer, llm, None, Stage2Weights(align=0), prompt_length=3)
    plain.eval()
    skipped.eval()
    with torch.no_grad():
        a, b = stage_losses(plain, batch)["lm_loss"], stage_losses(skipped, batch)["lm_loss"]
    assert set(stage_losses(plain, batch)) == {"lm_loss", "loss"} and not torch.allclose(a, b)
    assert np.isfinite(float(b))
