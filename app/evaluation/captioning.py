"""Caption scoring exactly as the COCO caption protocol does it (pycocoevalcap).

References and results are tokenized with the PTB tokenizer (Stanford CoreNLP, through Java), then
scored with BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D); SPICE too when its Stanford models can be had
(they are downloaded at first use: offline it is reported as unavailable, never a failure). Only the
images that have a result are scored, as `COCOEvalCap` does. Metric names are pycocoevalcap's.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from app.errors import UserError

logger = logging.getLogger(__name__)

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


class EvaluationError(UserError, ValueError):
    """Results or references that cannot be scored (bad format, no overlap)."""


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """A COCO results file: `[{"image_id": ..., "caption": "..."}]`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvaluationError(f"cannot read results file {path}: {err}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "image_id" in r and isinstance(r.get("caption"), str)
                                             for r in data):
        raise EvaluationError(f"{path} is not a COCO results file (a list of {{image_id, caption}})")
    return data


def load_references(path: str | Path) -> dict[Any, list[str]]:
    """References from a COCO caption annotation file, or from `{image_id: [captions]}`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvaluationError(f"cannot read annotation file {path}: {err}") from None
    refs: dict[Any, list[str]] = defaultdict(list)
    if isinstance(data, dict) and "annotations" in data:
        for ann in data["annotations"]:
            if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and "image_id" in ann:
                refs[ann["image_id"]].append(ann["caption"])
    elif isinstance(data, dict):
        for image_id, captions in data.items():
            refs[image_id] = [c for c in (captions if isinstance(captions, list) else [captions]) if isinstance(c, str)]
    else:
        raise EvaluationError(f"{path} is neither a COCO caption annotation file nor {{image_id: [captions]}}")
    return dict(refs)


def spice_available() -> bool:
    """SPICE needs Stanford CoreNLP jars next to pycocoevalcap's spice-1.0.jar (fetched on first use
    when online). Without them it is reported as unavailable, and no download is attempted."""
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap.spice.spice")
    if spec is None or spec.origin is None:
        return False
    lib = Path(spec.origin).parent / "lib"
    return (lib / "stanford-corenlp-3.6.0.jar").exists() and (lib / "stanford-corenlp-3.6.0-models.jar").exists()


def _scorers(with_spice: bool):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), "METEOR"), (Rouge(), "ROUGE_L"),
               (Cider(), "CIDEr")]
    if with_spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), "SPICE"))
    return scorers


def score_captions(results: list[dict[str, Any]], references: dict[Any, list[str]], spice: bool = True
                   ) -> tuple[dict[str, Optional[float]], dict[Any, dict[str, float]]]:
    """(corpus metrics, per-image metrics). SPICE is None when it cannot run (offline)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Image ids from JSON object keys are strings; match results to references either way.
    by_key = {str(k): v for k, v in references.items()}
    res, gts = {}, {}
    for item in results:
        key = str(item["image_id"])
        if key not in by_key:
            continue
        res[key] = [{"caption": item["caption"]}]  # as COCO: one result per image (the last one wins)
        gts[key] = [{"caption": c} for c in by_key[key]]
    missing = len({str(r["image_id"]) for r in results}) - len(res)
    if not res:
        raise EvaluationError(f"no result matches a reference image ({len(results)} results, {len(references)} "
                              f"reference images)")
    if missing:
        logger.warning("%d result image ids have no references and are not scored", missing)
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    metrics: dict[str, Optional[float]] = {}
    per_image: dict[Any, dict[str, float]] = {key: {} for key in res}
    for scorer, names in _scorers(with_spice=False):
        score, scores = scorer.compute_score(gts, res)
        for name, value, values in (zip(names, score, scores) if isinstance(names, list) else [(names, score, scores)]):
            metrics[name] = float(value)
            for key, v in zip(res, values):
                per_image[key][name] = float(v)
    metrics["SPICE"] = None
    if spice and not spice_available():
        logger.warning("SPICE unavailable: Stanford CoreNLP models are not installed; reported as null")
    elif spice:
        try:
            scorer, name = _scorers(with_spice=True)[-1]
            score, scores = scorer.compute_score(gts, res)
            metrics[name] = float(score)
            for key, v in zip(res, scores):
                per_image[key][name] = float(v["All"]["f"]) if isinstance(v, dict) else float(v)
        except Exception as err:  # needs Stanford CoreNLP models, downloaded at first use
            logger.warning("SPICE unavailable (%s: %s); reported as null", type(err).__name__, str(err)[:200])
    return metrics, per_image
