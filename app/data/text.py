"""Text corpora for stage 0: read (txt/tsv/csv/jsonl/parquet, local or s3://), clean, tokenize, stream.

Reading never fails on a bad line: each raw row carries either its text or the reason it is
unusable (`undecodable`, `invalid`), and the preprocessing step counts and drops those, together
with texts that are empty after cleaning. Tokenisation runs in `map_batches` on CPU workers and
emits fixed-width int arrays; the training step trims the shared right padding.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import re
import zlib
from collections import Counter
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.datasource import FileBasedDatasource, FileShuffleConfig
# Imported with the module, not lazily inside a task: Ray may start a data task while another thread of the
# same worker is still importing torch, and a lazy import then fails with a partially initialised module.
from transformers import AutoTokenizer

from app import storage
from app.data.stats import report_counts

logger = logging.getLogger(__name__)

FORMAT_BY_EXTENSION = {".txt": "txt", ".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl",
                       ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
CHUNK_ROWS = 8192
SCHEMA = pa.schema([("text", pa.string()), ("problem", pa.string())])


def file_format(path: str, configured: str = "auto") -> Optional[str]:
    if configured != "auto":
        return configured
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    for ext, fmt in FORMAT_BY_EXTENSION.items():
        if name.endswith(ext):
            return fmt
    return None


def corpus_files(uri: str, fmt: str = "auto", s3: storage.S3Options | None = None):
    """(filesystem, {format: [paths]}) for a corpus URI; FileNotFoundError names what is missing."""
    fs, files = storage.list_files(uri, s3)
    by_format: dict[str, list[str]] = {}
    for path in files:
        found = file_format(path, fmt)
        if found is not None:
            by_format.setdefault(found, []).append(path)
    if not by_format:
        raise FileNotFoundError(f"no .txt/.tsv/.csv/.jsonl/.parquet files found at {uri}")
    return fs, by_format


# ---------------------------------------------------------------------------------------------
# reading: one datasource for the line-oriented formats


def _raw_lines(f) -> Iterator[bytes]:
    rest = b""
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _decode(line: bytes) -> Optional[str]:
    try:
        return line.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_rows(raw_lines: Iterable[bytes], fmt: str, column: str, path: str = "") -> Iterator[tuple[Optional[str], Optional[str]]]:
    """Yield (text, problem) per row; exactly one of the two is None."""
    lines = iter(raw_lines)
    if fmt == "txt":
        for raw in lines:
            text = _decode(raw)
            yield (text, None) if text is not None else (None, "undecodable")
        return
    if fmt == "jsonl":
        for raw in lines:
            text = _decode(raw)
            if text is None:
                yield None, "undecodable"
                continue
            if not text.strip():
                yield "", None
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                yield None, "invalid"
                continue
            value = record.get(column) if isinstance(record, dict) else None
            yield (value, None) if isinstance(value, str) else (None, "invalid")
        return
    if fmt in ("tsv", "csv"):
        undecodable = [0]

        def decoded() -> Iterator[str]:
            for raw in lines:
                text = _decode(raw)
                if text is None:
                    undecodable[0] += 1
                else:
                    yield text

        if fmt == "tsv":
            reader = (line.split("\t") for line in decoded())
        else:  # the csv module needs the line ends back to keep newlines inside quoted fields
            reader = csv.reader(line + "\n" for line in decoded())
        header = next(reader, None)
        index = header.index(column) if header and column in header else None
        if header is not None and index is None:
            logger.warning("%s: no column %r in header %s; its rows are counted as invalid", path, column, header)
        for row in reader:
            while undecodable[0]:
                undecodable[0] -= 1
                yield None, "undecodable"
            if index is None or len(row) <= index:
                yield None, "invalid"
            else:
                yield row[index], None
        while undecodable[0]:
            undecodable[0] -= 1
            yield None, "undecodable"
        return
    raise ValueError(f"unsupported text format {fmt!r}")


def _table(rows: list[tuple[Optional[str], Optional[str]]]) -> pa.Table:
    texts, problems = zip(*rows) if rows else ((), ())
    return pa.table({"text": pa.array(texts, pa.string()), "problem": pa.array(problems, pa.string())})


def in_blocks(rows: Iterable, size: int, to_table) -> Iterator[pa.Table]:
    """Group a row stream into tables of `size` rows (the last one shorter), for a datasource's blocks."""
    block: list = []
    for row in rows:
        block.append(row)
        if len(block) >= size:
            yield to_table(block)
            block = []
    if block:
        yield to_table(block)


class CorpusDatasource(FileBasedDatasource):
    """Streams txt/tsv/csv/jsonl files in blocks of CHUNK_ROWS rows; bad lines become counted rows."""

    def __init__(self, paths, *, fmt: str, column: str, **kwargs):
        super().__init__(paths, **kwargs)
        self._fmt = fmt
        self._column = column

    def _read_stream(self, f: "pa.NativeFile", path: str) -> Iterator[pa.Table]:
        yield from in_blocks(parse_rows(_raw_lines(f), self._fmt, self._column, path), CHUNK_ROWS, _table)


def _parquet_to_rows(batch: pa.Table, column: str) -> pa.Table:
    values = batch.column(column).to_pylist()
    return _table([(v, None) if isinstance(v, str) else (None, "invalid") for v in values])


def file_order(shuffle_files: bool, seed: Optional[int]) -> "FileShuffleConfig | None":
    """How a training read orders its files: shuffled from `seed` (a new order each epoch, the same orders in
    every run with that seed, as the reference's seeded DistributedSampler gives), or as listed."""
    return FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle_files else None


def read_corpus(uri: str, *, fmt: str = "auto", column: str = "caption", s3: storage.S3Options | None = None,
                shuffle_files: bool = True, seed: Optional[int] = None) -> ray.data.Dataset:
    """Raw rows `{text, problem}` of every corpus file under `uri`."""
    fs, by_format = corpus_files(uri, fmt, s3)
    shuffle = file_order(shuffle_files, seed)
    parts = []
    for found, paths in sorted(by_format.items()):
        if found == "parquet":
            ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle).select_columns([column])
            parts.append(ds.map_batches(_parquet_to_rows, fn_kwargs={"column": column}, batch_format="pyarrow"))
        else:
            parts.append(ray.data.read_datasource(CorpusDatasource(paths, fmt=found, column=column,
                                                                    filesystem=fs, shuffle=shuffle)))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


# ---------------------------------------------------------------------------------------------
# cleaning and tokenisation


# C0 control characters other than whitespace, and DEL: never part of a caption (a NUL from a broken
# export would otherwise reach the byte-level LLM tokenizer as a token of its own).
_CONTROL = {code: None for code in (*range(0, 9), 11, 12, *range(14, 32), 127)}


def clean_text(text: str, max_chars: int) -> str:
    """Drop control characters, collapse whitespace (tabs, newlines, runs of spaces), strip, cut to
    max_chars at a word edge."""
    text = " ".join(text.translate(_CONTROL).split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return text


_BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's caption normalisation (LAVIS `BlipCaptionProcessor.pre_caption`): lowercase, each of
    .!"()*#:;~ to a space, runs of whitespace to one space, stripped, cut to `max_words` words."""
    caption = _BLIP_PUNCTUATION.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def normalise_caption(text: str, style: str = "blip", max_words: int = 50, max_chars: int = 1000) -> str:
    """The caption as every tokenizer sees it (data.caption_style): BLIP's `pre_caption` ("blip") or the text
    as written ("raw"); then whitespace collapsed and cut to `max_chars`. Empty = unusable (counted)."""
    if style == "blip":
        text = pre_caption(text, max_words)
    elif style != "raw":
        raise ValueError(f"caption style must be 'blip' or 'raw', not {style!r}")
    return clean_text(text, max_chars)


def split_words(text: str, rng: np.random.Generator, stage0: bool = False) -> tuple[str, str]:
    """Random prefix/suffix split for prefix-LM (encoder-decoder LLMs) at a word index k.

    Stage 2 (`blip2_pformer_t5.py`): k in [1, max(1, n_words // 2)]. Stage 0 (`pformer_t5.py`, Python's
    inclusive `random.randint(1, 1 + n // 2)`): k in [1, n_words // 2 + 1], so a two-word caption may be
    split after both words. A split after every word becomes (caption, ""): the target is then only
    the end-of-sequence token (the reference crashes on one-word captions; this does not).
    """
    words = text.split()
    high = len(words) // 2 + 1 if stage0 else max(1, len(words) // 2)
    k = int(rng.integers(1, high + 1))
    return " ".join(words[:k]), " ".join(words[k:])


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str):
    """Tokenizers are cached per worker process: Ray reuses workers across tasks."""
    tok = AutoTokenizer.from_pretrained(name_or_path)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize(tok, texts: list[str], max_len: int, prefix: str) -> dict[str, np.ndarray]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return {f"{prefix}_ids": enc["input_ids"].astype(np.int32),
            f"{prefix}_mask": enc["attention_mask"].astype(np.int8)}


def preprocess_text_batch(batch: dict[str, np.ndarray], *, pformer_tokenizer: str, llm_tokenizer: str,
                          llm_is_encoder_decoder: bool, max_chars: int, max_txt_len: int, seed: int,
                          counter=None, caption_style: str = "blip", max_words: int = 50) -> dict[str, np.ndarray]:
    """Raw rows -> token arrays for the P-Former and the LLM. Bad rows are counted, not raised.

    Decoder-only LLM: the caption + "\\n" (newline is the end-of-caption token for generation).
    Encoder-decoder LLM: a random word split; the encoder reads the prefix, the decoder the suffix.
    """
    counts: Counter = Counter(rows_read=len(batch["text"]))
    texts: list[str] = []
    for text, problem in zip(batch["text"], batch["problem"]):
        if problem is not None or not isinstance(text, str):
            counts[f"skipped_{problem or 'invalid'}"] += 1
            continue
        text = normalise_caption(text, caption_style, max_words, max_chars)
        if not text:
            counts["skipped_empty"] += 1
            continue
        texts.append(text)
    counts["rows_kept"] = len(texts)
    report_counts(counter, counts)

    if not texts:
        return {}  # an empty batch (Ray Data drops it); zero-row arrays would be pickled as objects

    out = tokenize(load_tokenizer(pformer_tokenizer), texts, max_txt_len, "pformer")
    llm_tok = load_tokenizer(llm_tokenizer)
    if llm_is_encoder_decoder:
        # Seeded by the batch content: reproducible, yet different splits for different captions.
        rng = np.random.default_rng([seed, zlib.crc32("\n".join(texts).encode())])
        prefixes, suffixes = zip(*(split_words(t, rng, stage0=True) for t in texts))
        out.update(tokenize(llm_tok, list(prefixes), max_txt_len, "llm"))
        out.update(tokenize(llm_tok, list(suffixes), max_txt_len, "llm_target"))
    else:
        out.update(tokenize(llm_tok, [t + "\n" for t in texts], max_txt_len, "llm"))
    return out


def text_dataset(cfg, *, llm_is_encoder_decoder: bool, counter=None,
                 s3: storage.S3Options | None = None) -> ray.data.Dataset:
    """The stage-0 training dataset: raw corpus rows -> cleaned, tokenized fixed-width arrays."""
    raw = read_corpus(cfg.data.text, fmt=cfg.data.text_format, column=cfg.data.text_column, s3=s3, seed=cfg.run.seed)
    return raw.map_batches(
        preprocess_text_batch,
        batch_size=1024,
        batch_format="numpy",
        fn_kwargs=dict(pformer_tokenizer=cfg.model.pformer, llm_tokenizer=cfg.model.llm,
                       llm_is_encoder_decoder=llm_is_encoder_decoder, max_chars=cfg.data.max_chars,
                       max_txt_len=cfg.data.max_txt_len, seed=cfg.run.seed, counter=counter,
                       caption_style=cfg.data.caption_style, max_words=cfg.data.max_words),
    )


def check_corpus(uri: str, fmt: str, column: str, s3: storage.S3Options | None = None) -> None:
    """Fail fast, from one listing: no corpus files, only empty files, or a first tabular file without
    `column` (reads one line or the Parquet schema). Raises FileNotFoundError or ValueError."""
    fs, by_format = corpus_files(uri, fmt, s3)
    paths = [p for ps in by_format.values() for p in ps]
    if all(info.size == 0 for info in fs.get_file_info(paths)):
        raise ValueError(f"the corpus at {uri} is empty ({len(paths)} file(s), 0 bytes)")
    for found, paths in by_format.items():
        if found == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(paths[0], filesystem=fs).names
        elif found in ("tsv", "csv"):
            with fs.open_input_stream(paths[0]) as f:
                first = f.read(1 << 16).split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
            names = first.split("\t") if found == "tsv" else next(csv.reader(io.StringIO(first)), [])
        else:
            continue
        if column not in names:
            raise ValueError(f"{storage.to_uri(fs, paths[0])} has no column {column!r} (columns: {names}); "
                             f"set data.text_column")
