"""Prepare the embedded default's assets once: a generated text corpus, tiny models trained on it, drawn
images with captions written as WebDataset shards (through the same writer as real data), and a tiny
vision tower pre-trained on other drawn scenes (frozen in the pipeline, like BLIP-2's EVA-CLIP). A second
call with the same settings reuses everything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from app.demo.questions import reading_corpus, vqa_files
from app.demo.shapes import corpus, draw, novel_scene_captions, scene_captions, scene_key
from app.demo.vision import pretrain_demo_vision
from app.models.tiny import build_tiny_vision, prepare_tiny_models

DEFAULT_ROOT = Path(".demo")
IMAGE_SIZE = 96  # drawn size; the vision tower sees DEMO_VISION_SIZE after the transforms
DEMO_VISION_SIZE = 64
DEMO_VISION_PATCH = 8
READY = "READY.json"


def _write_images(folder: Path, drawn: list[tuple[dict, list[str]]]) -> Path:
    """Each (scene, captions) drawn as `<folder>/<index:06d>.png`, with `captions.json` (what the shard writer
    reads) and `scenes.json` (each file's scene: what the demo's diagnostics score captions and answers against)."""
    folder.mkdir(parents=True, exist_ok=True)
    captions, scenes = {}, {}
    for i, (scene, texts) in enumerate(drawn):
        name = f"{i:06d}.png"
        draw(scene).save(folder / name)
        captions[name] = texts
        scenes[name] = scene
    (folder / "scenes.json").write_text(json.dumps(scenes))
    path = folder / "captions.json"
    path.write_text(json.dumps(captions, indent=0))
    return path


def load_scenes(folder: str | Path) -> dict[str, dict]:
    """{sample key ("000123", as the shards and the evaluation name a picture): scene} of a drawn split."""
    data = json.loads((Path(folder) / "scenes.json").read_text())
    return {Path(name).stem: scene for name, scene in data.items()}


def prepare_image_assets(root: Path, num_train: int, num_val: int, seed: int, vision_steps: int = 1000) -> dict[str, str]:
    """`<root>/images/{train,val}` (PNG + captions.json), `<root>/shards/{train,val}`, `<root>/models/vision`
    (pre-trained on other drawn scenes for `vision_steps` steps; 0 keeps it random)."""
    settings = {"num_train": num_train, "num_val": num_val, "seed": seed, "size": IMAGE_SIZE,
                "vision": DEMO_VISION_SIZE, "patch": DEMO_VISION_PATCH, "vision_steps": vision_steps, "version": 3}
    paths = {"train": str(root / "shards" / "train"), "val": str(root / "shards" / "val"),
             "vision": str(root / "models" / "vision")}
    ready = root / "shards" / READY
    if (ready.exists() and json.loads(ready.read_text()) == settings
            and (Path(paths["vision"]) / "config.json").exists()):
        return paths
    print(f"[demo] drawing {num_train} + {num_val} pictures and writing them as WebDataset shards", flush=True)
    import ray

    from app.data.shards import load_captions_json, make_shards

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
            listing = _write_images(root / "images" / split, scene_captions(count, seed=split_seed))
            make_shards(str(listing.parent), load_captions_json(listing), paths[split], shard_size=500,
                        per="caption" if split == "train" else "file")
    finally:
        if started:
            ray.shutdown()
    build_tiny_vision(paths["vision"], kind="blip2", image_size=DEMO_VISION_SIZE, patch_size=DEMO_VISION_PATCH,
                      hidden=64, seed=seed)
    if vision_steps:
        print(f"[demo] pre-training the tiny image encoder on drawn scenes ({vision_steps} steps)", flush=True)
        accuracy = pretrain_demo_vision(paths["vision"], draw_size=IMAGE_SIZE, steps=vision_steps, seed=seed)
        folded: dict[str, list[float]] = {}
        for name, value in accuracy.items():  # per-position labels folded by attribute (their lowest)
            folded.setdefault(name.split("@")[0].replace("occupied", "position"), []).append(value)
        print("[demo] image encoder held-out accuracy (its pre-training heads, lowest position): "
              + ", ".join(f"{k} {min(v):.3f}" for k, v in folded.items()), flush=True)
    ready.write_text(json.dumps(settings))
    return paths


TEST_CAPTIONS = 5  # references per held-out test picture (COCO's count): a steadier score than val's 2


def prepare_test_pictures(root: Path, num_test: int, test_seed: int, num_train: int, num_val: int,
                          seed: int) -> dict[str, str]:
    """`<root>/shards/test`: `num_test` pictures drawn with `test_seed`, TEST_CAPTIONS captions each, whose
    scenes (objects, background, relation: everything a caption can say) appear in neither the training
    nor the validation pictures, nor twice; `<root>/shards/READY_test.json` records how many draws were
    dropped for each reason."""
    out = root / "shards" / "test"
    ready = root / "shards" / "READY_test.json"
    settings = {"num_test": num_test, "test_seed": test_seed, "num_train": num_train, "num_val": num_val,
                "seed": seed, "captions": TEST_CAPTIONS, "size": IMAGE_SIZE, "version": 2}
    if ready.exists() and json.loads(ready.read_text()).get("settings") == settings:
        return {"test": str(out), **vqa_paths(root, "test")}
    exclude = {scene_key(scene) for scene, _ in scene_captions(num_train, seed=seed)}
    exclude |= {scene_key(scene) for scene, _ in scene_captions(num_val, seed=seed + 1)}
    drawn, dropped = novel_scene_captions(num_test, exclude, TEST_CAPTIONS, seed=test_seed)
    print(f"[demo] drawing {num_test} held-out test pictures (seed {test_seed}; dropped {dropped} draws whose "
          f"scene was already used)", flush=True)
    import ray

    from app.data.shards import load_captions_json, make_shards

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        listing = _write_images(root / "images" / "test", drawn)
        make_shards(str(listing.parent), load_captions_json(listing), str(out), shard_size=500, per="file")
    finally:
        if started:
            ray.shutdown()
    two = sum(len(scene["objects"]) == 2 for scene, _ in drawn)
    vqa = write_vqa(root, "test", [scene for scene, _ in drawn], [texts for _, texts in drawn], test_seed)
    ready.write_text(json.dumps({"settings": settings, "dropped": dropped, "kept": num_test,
                                 "excluded_scenes": len(exclude), "two_object_pictures": two}))
    return {"test": str(out), **vqa}


VQA_PER_PICTURE = 3  # questions per picture, drawn from every question the scene allows
VQA_IMAGE_PATTERN = "{image_id:06d}.png"  # the drawn pictures' file names under images/<split>


def vqa_paths(root: Path, split: str) -> dict[str, str]:
    folder = root / "vqa"
    return {f"vqa_{split}_questions": str(folder / f"{split}_questions.json"),
            f"vqa_{split}_annotations": str(folder / f"{split}_annotations.json"),
            f"vqa_{split}_images": str(root / "images" / split)}


def write_vqa(root: Path, split: str, scenes: list[dict], captions: list[list[str]], seed: int) -> dict[str, str]:
    """`<root>/vqa/<split>_{questions,annotations}.json`: VQAv2-format questions about the pictures of
    `images/<split>` (image id = file number), VQA_PER_PICTURE each, with ten answers and the reference
    caption that says the answer (for the text-only oracle). Written only when their content changes."""
    questions, annotations = vqa_files(scenes, split, VQA_PER_PICTURE, seed, captions)
    paths = vqa_paths(root, split)
    for key, content in ((f"vqa_{split}_questions", questions), (f"vqa_{split}_annotations", annotations)):
        path, text = Path(paths[key]), json.dumps(content)
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return paths


DEMO_LLM_STEPS = {"opt": 1500, "t5": 1500}


class DemoAssets(BaseModel):
    """The `demo` section of a pipeline config: what to generate before the stages run."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(str(DEFAULT_ROOT), min_length=1, description="Folder of the generated assets (relative to the working directory).")
    num_lines: int = Field(50_000, ge=100, description="Caption lines of the text corpus (stage 0 and the tiny LLM).")
    num_train_images: int = Field(2000, ge=8, description="Drawn training pictures (2 captions each).")
    num_val_images: int = Field(200, ge=4, description="Drawn validation pictures (2 captions each).")
    vision_steps: int = Field(1000, ge=0, description="Pre-training steps of the tiny image encoder (0: random).")
    llms: list[Literal["opt", "t5"]] = Field(default_factory=lambda: ["opt"], min_length=1,
                                             description="Tiny LLMs to prepare (t5 takes a few minutes).")
    llm_steps: Optional[int] = Field(None, ge=0, description="Language-modelling steps of each tiny LLM "
                                                             "(default: 1500 each; fewer for wiring checks).")
    num_test_images: int = Field(0, ge=0, description="Held-out test pictures (shards/test; 0: none), each "
                                                       "with a scene in neither the training nor the validation pictures.")
    test_seed: int = Field(1000, description="Seed of the test pictures' drawing (the training pictures use `seed`, "
                                             "validation `seed + 1`).")
    seed: int = 0


def asset_fingerprint(root: str | Path) -> dict[str, float]:
    """Modification times of the READY files: unchanged when a call reused everything."""
    root = Path(root)
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.glob("*/READY*.json"))}


def prepare_demo_assets(root: str | Path = DEFAULT_ROOT, num_lines: int = 50_000, num_train_images: int = 2000,
                        num_val_images: int = 200, seed: int = 0, llms: Sequence[str] = ("opt",),
                        vision_steps: int = 1000, num_test_images: int = 0, test_seed: int = 1000,
                        llm_steps: Optional[int] = None) -> dict[str, str]:
    """`<root>/text/corpus.txt`, `<root>/models/{bert,vision}` + one folder per tiny LLM in `llms` (opt: a
    few seconds; t5: a few minutes, it needs more steps to learn to read its encoder) and
    `<root>/shards/{train,val}`. Prints what it builds; a call that finds everything in place prints one
    line and returns at once."""
    shown, root = root, Path(root).resolve()  # absolute: Ray workers do not share the caller's directory
    before = asset_fingerprint(root)
    text_path = root / "text" / "corpus.txt"
    lines = corpus(num_lines, seed)
    content = "\n".join(lines) + "\n"
    if not text_path.exists() or text_path.read_text() != content:
        text_path.parent.mkdir(parents=True, exist_ok=True)
        text_path.write_text(content)
    # The tiny OPT learns from captions, caption-paraphrase pairs and questions about a caption with their
    # short answers: without the pairs it barely reads a soft prompt (stage 2 converges to one caption for
    # every picture); without the questions it has no skill for zero-shot VQA to carry over.
    lm_steps = DEMO_LLM_STEPS if llm_steps is None else dict.fromkeys(DEMO_LLM_STEPS, llm_steps)
    reading = reading_corpus(num_lines, seed + 7, separator="</s>")
    models = prepare_tiny_models(root / "models", lines, seed=seed, bert_vocab=500, llm_vocab=500, llms=tuple(llms),
                                 lm_steps=lm_steps, lm_lines=reading, lm_max_len=64,
                                 llm_tokenizer_lines=[line.replace("</s>", "") for line in reading], lm_one_cycle=True)
    images = prepare_image_assets(root, num_train_images, num_val_images, seed, vision_steps)
    images.update(write_vqa(root, "val", [scene for scene, _ in scene_captions(num_val_images, seed=seed + 1)],
                            [texts for _, texts in scene_captions(num_val_images, seed=seed + 1)], seed))
    if num_test_images:
        images.update(prepare_test_pictures(root, num_test_images, test_seed, num_train_images, num_val_images, seed))
    after = asset_fingerprint(root)
    print(f"[demo] reusing the assets prepared earlier in {shown}" if before and before == after else
          f"[demo] assets ready in {shown}", flush=True)
    return {"text": str(text_path), **models, **images}


VIDEO_DATA = Path("..") / "shared" / "data"


def prepare_video_assets(root: str | Path = DEFAULT_ROOT, clips: str | Path = VIDEO_DATA / "msrvtt" / "captions.json",
                         text: str | Path = VIDEO_DATA / "text" / "msrvtt_captions.tsv", seed: int = 0) -> dict[str, str]:
    """What the tiny video configs read, under `<root>/video`: `shards/` (the clips of the `clips` listing,
    one sample per clip with all its captions), `models/bert` and `models/t5` (tokenizers trained on the
    caption column of `text`; the T5 briefly pre-trained on it) and `models/clip` (a random tiny
    CLIPVisionModel, 64 px, patch 8). Cached: a second call with the same inputs returns at once."""
    import csv

    root = Path(root) / "video"
    clips, text = Path(clips), Path(text)
    for path, what in ((clips, "clip listing (captions.json)"), (text, "caption text (.tsv)")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    with text.open(encoding="utf-8", newline="") as f:
        lines = [row["caption"] for row in csv.DictReader(f, delimiter="\t") if (row.get("caption") or "").strip()]
    if not lines:
        raise ValueError(f"{text} has no 'caption' column with text")
    paths = prepare_tiny_models(root / "models", lines, seed=seed, llms=("t5",))
    paths["clip"] = str(root / "models" / "clip")
    paths["shards"] = str(root / "shards")
    settings = {"clips": str(clips.resolve()), "size": clips.stat().st_size, "seed": seed, "version": 1}
    ready = root / "shards" / READY
    if not (ready.exists() and json.loads(ready.read_text()) == settings and (Path(paths["clip"]) / "config.json").exists()):
        import ray

        from app.data.shards import listed_keys, load_captions_json, make_shards

        print(f"[demo] writing the clips of {clips} as WebDataset shards", flush=True)
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            make_shards(str(clips.parent), load_captions_json(clips), paths["shards"], shard_size=6, per="file",
                        keys=listed_keys(clips))
        finally:
            if started:
                ray.shutdown()
        build_tiny_vision(paths["clip"], kind="clip", image_size=64, patch_size=8, hidden=64, seed=seed)
        ready.write_text(json.dumps(settings))
    return paths
