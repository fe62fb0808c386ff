"""Image-text data: decoding and conversions, transforms, the tar reader, skip-and-count on bad shards
(real Flickr8k photos made bad in the ways web data is), and a stage-1 run on them through real Ray."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from app.data.captions import CaptionSpec
from app.data.samples import preprocess_image_batch
from app.data.media import MediaSpec
from app.data.sources import SCHEMA, iter_tar_samples
from app.data.transforms import decode_image, random_resized_crop_box, transform_image

from conftest import FLICKR, bad_samples, encoded, photo, write_tar


# ---------------------------------------------------------------------------------------------
# decoding and transforms


def test_decode_converts_non_rgb_and_rejects_corrupt_data():
    rgb = Image.open(io.BytesIO(photo(0))).convert("RGB")
    assert decode_image(photo(0))[1] is None
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG")):
        image, converted = decode_image(encoded(rgb.convert(mode), fmt))
        assert image.mode == "RGB" and image.size == rgb.size and converted == mode
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode_image(encoded(transparent, "PNG"))[0].getpixel((0, 0)) == (255, 255, 255)  # composited on white
    with pytest.raises(OSError):
        decode_image(photo(0)[:2000])
    # JPEG draft decoding keeps both sides at least as large as asked.
    big = encoded(rgb.resize((800, 600)), "JPEG")
    drafted, _ = decode_image(big, draft_size=128)
    assert 128 <= min(drafted.size) < 600


def test_random_resized_crop_stays_inside_and_covers_the_area_range():
    rng = np.random.default_rng(0)
    for width, height in ((200, 150), (150, 200), (500, 40), (33, 33)):
        for _ in range(200):
            left, top, right, bottom = random_resized_crop_box(width, height, rng, (0.5, 1.0))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
    areas = [(r - l) * (b - t) / (200 * 150) for l, t, r, b in
             (random_resized_crop_box(200, 150, rng, (0.5, 1.0)) for _ in range(500))]
    assert 0.45 <= min(areas) and max(areas) <= 1.0 and np.mean(areas) > 0.6


def test_train_transform_is_random_and_eval_transform_is_a_plain_resize():
    image = Image.open(io.BytesIO(photo(0))).convert("RGB")
    rng = np.random.default_rng(0)
    crops = [transform_image(image, 32, True, rng) for _ in range(4)]
    assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in crops)
    assert any(not np.array_equal(crops[0], c) for c in crops[1:])
    resized = transform_image(image, 32, False)
    assert np.array_equal(resized, np.asarray(image.resize((32, 32), Image.BICUBIC)))


def test_train_transform_without_crop_or_flip_keeps_the_layout():
    # min_scale 1 (whole image) and flip off: what the picture shows left stays left (captions that say so).
    image = Image.open(io.BytesIO(photo(0))).convert("RGB").resize((48, 48))
    rng = np.random.default_rng(0)
    kept = [transform_image(image, 32, True, rng, min_scale=1.0, flip=False) for _ in range(8)]
    assert all(np.array_equal(k, transform_image(image, 32, False)) for k in kept)
    flipped = [transform_image(image, 32, True, rng, min_scale=1.0) for _ in range(16)]
    mirrored = transform_image(image, 32, False)[:, ::-1]
    assert any(np.array_equal(f, mirrored) for f in flipped) and any(not np.array_equal(f, mirrored) for f in flipped)


# ---------------------------------------------------------------------------------------------
# reading and preprocessing


def test_tar_reader_groups_members_and_survives_a_truncated_shard(tmp_path):
    path = write_tar(tmp_path / "bad.tar", bad_samples())
    with open(path, "rb") as f:
        rows = list(iter_tar_samples(f, path))
    assert [r["key"] for r in rows][:6] == [f"a{i:02d}" for i in range(6)] and len(rows) == 14
    by_key = {r["key"]: r for r in rows}
    assert by_key["g_alpha"]["captions"] == ["a png"] and by_key["c_no_caption"]["captions"] == []
    assert by_key["i_no_image"]["problem"] == "no_image"
    # A shard cut in the middle of a member: the samples before the cut, then one counted problem row.
    data = open(path, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    with open(cut, "rb") as f:
        rows = list(iter_tar_samples(f, str(cut)))
    assert rows[-1]["problem"] == "truncated_shard" and all(r["problem"] is None for r in rows[:-1])


def test_preprocess_counts_every_problem_and_keeps_the_rest(ray_session, tmp_path, tiny_models):
    import pyarrow as pa

    from app.data.stats import create_counter, read_counts, read_examples

    path = write_tar(tmp_path / "bad.tar", bad_samples())
    with open(path, "rb") as f:
        rows = list(iter_tar_samples(f, path))
    counter = create_counter()
    spec = CaptionSpec(qformer=tiny_models["bert"], pformer=tiny_models["bert"], llm=tiny_models["opt"],
                       prompt="a photo of", max_txt_len=16)
    out = preprocess_image_batch(pa.Table.from_pylist(rows, schema=SCHEMA), media=MediaSpec(size=32, train=True),
                                 captions=spec, counter=counter, keep_text=True)
    counts = read_counts(counter)
    assert counts == {"rows_read": 14, "rows_kept": 9, "skipped_corrupt_image": 2, "skipped_no_caption": 1,
                      "skipped_empty_caption": 1, "skipped_no_image": 1, "converted_cmyk": 1, "converted_l": 1,
                      "converted_rgba": 1}
    assert out["pixels"].shape == (9, 32, 32, 3) and out["pixels"].dtype == np.uint8
    assert list(out["key"]) == [f"a{i:02d}" for i in range(6)] + ["e_cmyk", "f_gray", "g_alpha"]
    assert out["qformer_ids"].shape == (9, 16) and out["pformer_ids"] is out["qformer_ids"]  # same vocabulary
    assert out["llm_ids"].shape[1] > 16  # room for the prompt
    examples = {e["key"]: e for e in read_examples(counter)}
    assert examples["b_truncated"]["reason"].startswith("corrupt_image") and examples["b_truncated"]["shard"] == path
    assert set(examples) == {"b_truncated", "c_no_caption", "d_empty_caption", "h_not_an_image", "i_no_image"}


def test_parquet_shards_read_like_webdataset(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.data.sources import read_image_text

    captions = json.loads((FLICKR / "captions.json").read_text())
    names = sorted(captions)[:5]
    table = pa.table({"key": names, "image": [{"bytes": (FLICKR / "images" / n).read_bytes(), "path": n} for n in names],
                      "caption": [captions[n] for n in names]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    rows = sorted(read_image_text(str(tmp_path)).take_all(), key=lambda r: r["key"])
    assert [r["key"] for r in rows] == names and [r["captions"] for r in rows] == [captions[n] for n in names]
    assert rows[0]["image"] == (FLICKR / "images" / names[0]).read_bytes() and rows[0]["shard"].endswith("part-0.parquet")
    with pytest.raises(ValueError, match="no column"):
        read_image_text(str(tmp_path), caption_column="text")


# ---------------------------------------------------------------------------------------------
# exact mid-epoch resume: sample ids, the epoch's record, the read that skips it


def test_an_epoch_record_names_whole_files_and_ranges_of_the_rest():
    from app.data.progress import EpochProgress, from_ranges, sample_id, skip_plan, to_ranges

    assert to_ranges(np.array([5, 1, 2, 3, 3, 9])) == [[1, 4], [5, 6], [9, 10]]
    assert from_ranges([[1, 4], [9, 10]]).tolist() == [1, 2, 3, 9]
    one, two = EpochProgress("d"), EpochProgress("d")
    one.add(np.array([sample_id(0, r) for r in range(0, 6)] + [sample_id(1, 7)]))
    two.add(np.array([sample_id(0, r) for r in range(6, 9)] + [sample_id(2, 0), sample_id(2, 1)]))
    one.merge(two)
    # file 0: rows 0-8 trained, row 9 unusable, 10 rows -> whole; file 1: row 7 only, its end never read;
    # file 2: both its rows trained -> whole; file 3: read, never trained on.
    record = one.record(file_rows={0: 10, 2: 2, 3: 4}, unusable={0: [9], 3: [0]})
    assert record == {"files": "d", "whole": [0, 2], "rows": {"1": [[7, 8]]}, "samples": 12,
                      "whole_rows": {"0": 10, "2": 2}}
    assert skip_plan(record) == {0: "whole", 2: "whole", 1: [[7, 8]]} and skip_plan(None) == {}
    again = EpochProgress.from_record(record)
    again.add(np.array([sample_id(1, 8)]))
    assert again.record({0: 10, 2: 2}, {})["rows"] == {"1": [[7, 9]]} and again.distinct({0: 10, 2: 2}) == 14
    assert one.record({}, {})["whole"] == []  # no file known to have ended: none whole


def test_a_training_read_numbers_its_rows_and_skips_what_the_epoch_trained_on(ray_session, tmp_path):
    """WebDataset and Parquet shards through the run's data actor: every row has a distinct sample id; an
    epoch's skip plan leaves whole files unread and drops the listed rows of the others, before decoding."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from app.data.progress import EpochProgress, ROW_BITS, skip_plan
    from app.data.sources import read_image_text
    from app.data.stats import create_counter

    captions = json.loads((FLICKR / "captions.json").read_text())
    names = sorted(captions)[:12]
    write_tar(tmp_path / "a.tar", [(n.rsplit(".", 1)[0], {"jpg": (FLICKR / "images" / n).read_bytes(),
                                                          "txt": captions[n][0].encode()}) for n in names[:6]])
    pq.write_table(pa.table({"key": names[6:], "image": [(FLICKR / "images" / n).read_bytes() for n in names[6:]],
                             "caption": [captions[n][0] for n in names[6:]]}), tmp_path / "b.parquet")
    counter = create_counter()
    ds = read_image_text(str(tmp_path), seed=0, plan=counter)
    rows = ds.take_all()
    ids = {r["sample_id"]: r["key"] for r in rows}
    assert len(ids) == 12 and sorted(ids.values()) == sorted(n.rsplit(".", 1)[0] for n in names[:6]) + names[6:]
    file_rows, _ = ray.get(counter.settled.remote())
    assert file_rows == {0: 6, 1: 6}  # a.tar, b.parquet: each read to its end
    trained = EpochProgress(ray.get(counter.files.remote()))
    trained.add(np.array([i for i in ids if i >> ROW_BITS == 0] + [i for i in ids if i >> ROW_BITS == 1][:2]))
    ray.get(counter.begin_epoch.remote(0, skip_plan(trained.record(file_rows, {}))))
    left = {r["sample_id"] for r in ds.take_all()}
    assert left == {i for i in ids if i >> ROW_BITS == 1} - {int(r) | (1 << ROW_BITS) for r in trained.rows[1][0]}
