"""Text corpora through real Ray Data: every format, bad lines skipped and counted, nothing raised."""


import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.models.tiny import tiny_config
from app.data.stats import create_counter, read_counts
from app.data.text import parse_rows, read_corpus, text_dataset


@pytest.fixture
def messy_corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_bytes(b"a dog runs\n\n   \n\xff\xfe bad bytes\na cat sleeps\r\n")
    (root / "b.tsv").write_bytes(b"image_id\tcaption\n1\ta red bus\n2\n3\t\xff bad\n4\t  \n")
    (root / "c.csv").write_bytes(b'id,caption\n1,"a man, on a horse"\n2,"two\nlines"\n3,\n')
    (root / "d.jsonl").write_text('{"caption": "a boat"}\n{"text": "x"}\n{bad json\n{"caption": 5}\n\n')
    pq.write_table(pa.table({"caption": ["a kite", None, "a train"]}), root / "e.parquet")
    (root / "notes.md").write_text("ignored: not a corpus format\n")
    return root


EXPECTED = {"rows_read": 20, "rows_kept": 8, "skipped_empty": 5, "skipped_undecodable": 2, "skipped_invalid": 5}


def test_parse_rows_by_format():
    rows = list(parse_rows([b"id,caption", b'1,"x, y"', b"2"], "csv", "caption"))
    assert rows == [("x, y", None), (None, "invalid")]
    rows = list(parse_rows([b"caption\tother", b"\xff", b"hi\tthere"], "tsv", "caption"))
    assert rows == [(None, "undecodable"), ("hi", None)]
    rows = list(parse_rows([b"a\tb", b"1\t2"], "tsv", "caption"))  # no such column: every row invalid
    assert rows == [(None, "invalid")]


def test_every_format_read_cleaned_tokenized_and_counted(ray_session, messy_corpus, tiny_models):
    raw = read_corpus(str(messy_corpus), column="caption", shuffle_files=False).take_all()
    assert len(raw) == EXPECTED["rows_read"]

    counter = create_counter()
    cfg = tiny_config(data={"text": str(messy_corpus)}, model={"pformer": tiny_models["bert"], "llm": tiny_models["opt"]})
    rows = text_dataset(cfg, llm_is_encoder_decoder=False, counter=counter).take_all()
    assert read_counts(counter) == EXPECTED
    assert len(rows) == EXPECTED["rows_kept"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    texts = sorted(tok.decode(r["pformer_ids"], skip_special_tokens=True) for r in rows)
    assert texts == sorted(["a dog runs", "a cat sleeps", "a red bus", "a man, on a horse", "two lines",
                            "a boat", "a kite", "a train"])
    assert all(r["llm_ids"].shape == (cfg.data.max_txt_len,) for r in rows)
