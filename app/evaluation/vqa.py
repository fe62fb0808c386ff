"""Zero-shot VQA scoring: VQAv2 accuracy with the official answer normalisation, and GQA exact match.

VQAv2 (Antol et al.; the evaluation script of visualqa.org): an answer is normalised (punctuation,
number words -> digits, articles dropped, contractions restored) and scored against the 10 human
answers as the mean over the 10 leave-one-out subsets of min(#matches among the other 9 / 3, 1).
Accuracies are reported in percent, overall and per answer type.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from typing import Iterable, Optional

# Punctuation the official script removes (or replaces by a space); '.' and ',' and "'" are handled apart.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written in the official script: drops periods not before a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# Contractions written without (some of) their apostrophes map back to the written form, e.g. "dont",
# "couldnt've", "couldn'tve" -> "couldn't've".
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "I'd", "I'd've",
    "I'm", "I've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've",
    "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd", "she'd've",
    "she's", "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll",
    "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've",
    "something'll", "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll",
    "they're", "they've", "'twas", "wasn't", "we'd", "we'd've", "we'll", "we're", "we've", "weren't", "what'll",
    "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll",
    "who're", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've",
    "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)
# Words that are also ordinary words once the apostrophe is gone are left alone ("its", "well", "were", ...).
_KEEP_AS_IS = frozenset({"its", "well", "were", "wed", "ill", "id", "hell", "shell", "lets", "cant", "wont", "shed",
                         "twas", "sha"})


def _contraction_map() -> dict[str, str]:
    out: dict[str, str] = {}
    for written in _CONTRACTIONS:
        marks = [i for i, c in enumerate(written) if c == "'"]
        for drop in itertools.chain.from_iterable(itertools.combinations(marks, n) for n in range(1, len(marks) + 1)):
            variant = "".join(c for i, c in enumerate(written) if i not in drop).lower()
            if variant not in _KEEP_AS_IS and variant != written.lower():
                out.setdefault(variant, written)
    # The official script restores these two even though they are words too.
    out.update({"cant": "can't", "wont": "won't"})
    return out


CONTRACTIONS = _contraction_map()


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def process_digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official VQAv2 answer normalisation."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Iterable[str]) -> float:
    """Accuracy in [0, 1] of one prediction against the human answers (10 in VQAv2)."""
    gts = [normalize_answer(a) for a in answers]
    if not gts:
        raise ValueError("a question without answers cannot be scored")
    pred = normalize_answer(prediction)
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answer: str) -> float:
    """GQA-style: 1 when the normalised prediction equals the normalised single answer."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def score_vqa(predictions: dict[str, str], truth: dict[str, dict], metric: str = "vqa"
              ) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics in percent: overall and per answer type, per-question accuracy in [0, 1]).

    `truth[qid]` = {"answers": [...], "answer_type": "..."}; `metric` "vqa" (VQAv2) or "exact" (GQA)."""
    per_question: dict[str, float] = {}
    by_type: dict[str, list[float]] = defaultdict(list)
    for qid, gt in truth.items():
        if qid not in predictions:
            continue
        if metric == "vqa":
            acc = vqa_accuracy(predictions[qid], gt["answers"])
        else:
            acc = exact_match(predictions[qid], gt["answers"][0])
        per_question[qid] = acc
        if gt.get("answer_type"):
            by_type[gt["answer_type"]].append(acc)
    if not per_question:
        raise ValueError("no prediction matches a question with answers")
    name = "vqa_accuracy" if metric == "vqa" else "exact_match"
    metrics = {name: round(100.0 * sum(per_question.values()) / len(per_question), 2)}
    for answer_type, values in sorted(by_type.items()):
        metrics[f"{name}_{_slug(answer_type)}"] = round(100.0 * sum(values) / len(values), 2)
    metrics["questions"] = len(per_question)
    return metrics, per_question


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "other"


def detect_metric(truth: dict[str, dict], requested: Optional[str] = None) -> str:
    """VQAv2 accuracy when questions have several human answers, exact match for single answers (GQA)."""
    if requested:
        return requested
    return "vqa" if any(len(gt["answers"]) > 1 for gt in truth.values()) else "exact"
