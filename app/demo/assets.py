"""Prepare the embedded default's assets once: a generated text corpus and tiny models trained on it."""

from __future__ import annotations

from pathlib import Path

from app.demo.shapes import corpus
from app.models.tiny import prepare_tiny_models

DEFAULT_ROOT = Path(".demo")


def prepare_demo_assets(root: str | Path = DEFAULT_ROOT, num_lines: int = 50_000, seed: int = 0) -> dict[str, str]:
    """`<root>/text/corpus.txt` and `<root>/models/{bert,opt,t5}`; a second call reuses them."""
    root = Path(root)
    text_path = root / "text" / "corpus.txt"
    lines = corpus(num_lines, seed)
    content = "\n".join(lines) + "\n"
    if not text_path.exists() or text_path.read_text() != content:
        text_path.parent.mkdir(parents=True, exist_ok=True)
        text_path.write_text(content)
    models = prepare_tiny_models(root / "models", lines, seed=seed, bert_vocab=500, llm_vocab=500)
    return {"text": str(text_path), **models}
