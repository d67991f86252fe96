"""mr1fast.trainer.data: every source kind loads the same examples, bad rows are skipped and counted (or
raise with strict=True), and the synthetic generators are deterministic and correct by
construction. All offline: the hub is monkeypatched."""
import base64
import io
import json
import os
import re
from collections import deque

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mr1fast.trainer import data
from mr1fast.trainer.data import (PROMPT_SUFFIX, answer_text, load_examples, make_counting,
                                  make_geometry, question, resolve_source, synthetic_dataset,
                                  write_examples)


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def picture(i):
    """A small RGB image that differs per i (and is not square, to catch transposes)."""
    image = Image.new("RGB", (9, 7), (10 * i, 255 - 10 * i, 40))
    image.putpixel((i % 9, i % 7), (255, 255, 255))
    return image


ROWS = [{"image": picture(i), "problem": f"How many objects are there? ({i})",
         "solution": f"<answer> {i} </answer>", "extra": i} for i in range(4)]
OTHER_SPLIT = [{"image": picture(9), "problem": "test question", "solution": "<answer> 9 </answer>",
                "extra": 9}]


def hf_table(rows):
    """Rows in the exact schema of a hub parquet file: image = struct {bytes, path}."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": png(r["image"]), "path": f"img_{i}.png"}
                       for i, r in enumerate(rows)], image_type)
    columns = {k: [r[k] for r in rows] for k in ("problem", "solution", "extra")}
    return pa.table({"image": images, **columns})


def hf_dataset(rows):
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string"),
                                  "extra": datasets.Value("int64")})
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features},
                                      features=features)


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


@pytest.fixture
def sources(tmp_path):
    """The same ROWS as every kind of local source (folders also hold a test split)."""
    pq.write_table(hf_table(ROWS), tmp_path / "single.parquet")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(hf_table(ROWS), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(hf_table(OTHER_SPLIT), tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    (tmp_path / "imgs").mkdir()
    lines = []
    for i, r in enumerate(ROWS):
        r["image"].save(tmp_path / "imgs" / f"{i}.png")
        lines.append({**r, "image": f"imgs/{i}.png"})
    write_jsonl(tmp_path / "paths.jsonl", lines)
    encoded = [base64.b64encode(png(r["image"])).decode() for r in ROWS]
    write_jsonl(tmp_path / "b64.jsonl",
                [{**r, "image": {"bytes": b64}} for r, b64 in zip(ROWS, encoded)])
    hf_dataset(ROWS).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": hf_dataset(ROWS), "test": hf_dataset(OTHER_SPLIT)}).save_to_disk(
        str(tmp_path / "disk_dict"))
    return {name: tmp_path / name for name in
            ("single.parquet", "hub", "paths.jsonl", "b64.jsonl", "disk", "disk_dict")}


def assert_matches(examples, rows):
    assert len(examples) == len(rows)
    for ex, r in zip(examples, rows):
        assert (ex.problem, ex.solution) == (r["problem"], r["solution"])
        assert ex.row == {"extra": r["extra"]}
        assert ex.image.mode == "RGB" and ex.image.size == r["image"].size
        assert ex.image.tobytes() == r["image"].tobytes()


@pytest.mark.parametrize("kind", ["single.parquet", "hub", "paths.jsonl", "b64.jsonl", "disk",
                                  "disk_dict"])
def test_every_source_kind_loads_the_same_examples(sources, kind):
    result = load_examples(sources[kind], warn=pytest.fail)
    assert_matches(result.examples, ROWS)
    assert [ex.index for ex in result.examples] == list(range(len(ROWS)))
    assert result.skipped == {} and result.source == str(sources[kind])


@pytest.mark.parametrize("kind", ["hub", "disk_dict"])
def test_folders_pick_the_split(sources, kind):
    assert_matches(load_examples(sources[kind], split="test").examples, OTHER_SPLIT)


def test_parquet_folder_without_split_names_uses_every_file(tmp_path):
    pq.write_table(hf_table(ROWS[:2]), tmp_path / "part-0.parquet")
    pq.write_table(hf_table(ROWS[2:]), tmp_path / "part-1.parquet")
    result = load_examples(tmp_path, split="train")
    assert_matches(result.examples, ROWS)
    assert [ex.index for ex in result.examples] == [0, 1, 2, 3]


def test_missing_split_of_a_dataset_dict(sources):
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_examples(sources["disk_dict"], split="validation")


def test_limit_stops_after_that_many_valid_examples(sources):
    assert_matches(load_examples(sources["hub"], limit=2).examples, ROWS[:2])
    assert_matches(load_examples(sources["hub"], rows=(1, 3)).examples, ROWS[1:3])
    assert [e.index for e in load_examples(sources["hub"], rows=(1, None), limit=1)
            .examples] == [1]
    with pytest.raises(ValueError, match="limit"):
        load_examples(sources["hub"], limit=0)


def prompt_chars(example):
    return len(question(example.problem))


BAD_LINES = {  # reason -> a JSONL line that must be skipped for it
    "bad_image": {"image": "imgs/missing.png", "problem": "p", "solution": "<answer> 1 </answer>"},
    "missing_image": {"problem": "p", "solution": "<answer> 1 </answer>"},
    "empty_solution": {"image": "imgs/0.png", "problem": "p", "solution": "   "},
    "empty_problem": {"image": "imgs/0.png", "solution": "<answer> 1 </answer>"},
    "wrong_type": {"image": "imgs/0.png", "problem": 5, "solution": "<answer> 1 </answer>"},
    "bad_json": '{"image": "imgs/0.png", "problem": ',
    "prompt_too_long": {"image": "imgs/0.png", "problem": "long " * 100,
                        "solution": "<answer> 1 </answer>"},
}


@pytest.fixture
def bad_jsonl(tmp_path):
    """Good rows at lines 0 and 9; lines 1-8 are bad (two bad images: missing file, corrupt)."""
    (tmp_path / "imgs").mkdir()
    ROWS[0]["image"].save(tmp_path / "imgs" / "0.png")
    good = {"image": "imgs/0.png", "problem": ROWS[0]["problem"], "solution": ROWS[0]["solution"],
            "extra": 0}
    corrupt = {"image": {"bytes": base64.b64encode(b"\x89PNG not really").decode()}, "problem": "p",
               "solution": "<answer> 1 </answer>"}
    return write_jsonl(tmp_path / "bad.jsonl", [good, *BAD_LINES.values(), corrupt, good])


def test_bad_rows_are_skipped_counted_and_warned_once_per_reason(bad_jsonl):
    warned = []
    result = load_examples(bad_jsonl, max_prompt_length=200, prompt_length=prompt_chars,
                           warn=warned.append)
    assert_matches(result.examples, [ROWS[0], ROWS[0]])
    assert [ex.index for ex in result.examples] == [0, 9]
    assert result.skipped == {**{reason: 1 for reason in BAD_LINES}, "bad_image": 2}
    assert sorted(warned) == sorted(f"skipped {n} rows of {bad_jsonl}: {reason}"
                                    for reason, n in result.skipped.items())


def test_rows_hold_out_the_first_rows_bad_ones_included(bad_jsonl):
    """A validation hold-out (rows 0..k) and the training rows (k..) never share a row, even
    where the hold-out's rows are bad: they are counted by position, not by validity."""
    held = load_examples(bad_jsonl, rows=(0, 5), warn=lambda m: None)
    rest = load_examples(bad_jsonl, rows=(5, None), warn=lambda m: None)
    assert [e.index for e in held.examples] == [0]
    assert [e.index for e in rest.examples] == [7, 9]     # 7: long, valid without a limit
    with pytest.raises(ValueError, match=r"no valid examples in rows 1\.\.5"):
        load_examples(bad_jsonl, rows=(1, 5), warn=lambda m: None)
    with pytest.raises(ValueError, match="rows"):
        load_examples(bad_jsonl, rows=(3, 3))


def test_default_warning_and_length_check_needs_both_arguments(bad_jsonl):
    with pytest.warns(UserWarning) as record:
        result = load_examples(bad_jsonl, max_prompt_length=200)  # no prompt_length: unchecked
    assert "prompt_too_long" not in result.skipped and len(result.examples) == 3
    assert sorted(str(w.message) for w in record) == sorted(
        f"skipped {n} rows of {bad_jsonl}: {reason}" for reason, n in result.skipped.items())
    assert {w.filename for w in record} == {__file__}  # attributed to the caller


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_strict_raises_on_the_first_bad_row(tmp_path, reason):
    (tmp_path / "imgs").mkdir()
    ROWS[0]["image"].save(tmp_path / "imgs" / "0.png")
    good = {"image": "imgs/0.png", "problem": "p", "solution": "<answer> 1 </answer>"}
    path = write_jsonl(tmp_path / "x.jsonl", [good, BAD_LINES[reason], good])
    with pytest.raises(ValueError, match=rf"x\.jsonl: row 1: {reason}"):
        load_examples(path, strict=True, max_prompt_length=200, prompt_length=prompt_chars)
    assert len(load_examples(path, max_prompt_length=200, prompt_length=prompt_chars,
                             warn=lambda _: None).examples) == 2


def test_corrupt_image_bytes_in_parquet_and_dataset_folders_are_skipped(tmp_path):
    table = hf_table(ROWS[:2])
    images = pa.array([{"bytes": b"garbage", "path": None}, table["image"][1].as_py()],
                      table.schema.field("image").type)
    pq.write_table(table.set_column(0, "image", images), tmp_path / "x.parquet")
    result = load_examples(tmp_path / "x.parquet", warn=lambda _: None)
    assert result.skipped == {"bad_image": 1}
    assert_matches(result.examples, ROWS[1:2])
    corrupt = hf_dataset([{**ROWS[0], "image": {"bytes": b"garbage", "path": None}}, ROWS[1]])
    assert isinstance(corrupt.features["image"], datasets.Image)  # decoded when read by default
    corrupt.save_to_disk(str(tmp_path / "disk"))
    result = load_examples(tmp_path / "disk", warn=lambda _: None)
    assert result.skipped == {"bad_image": 1} and result.examples[0].index == 1


def test_no_valid_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [BAD_LINES["bad_json"], BAD_LINES["empty_problem"]])
    with pytest.raises(ValueError, match="no valid examples"):
        load_examples(path, warn=lambda _: None)


@pytest.mark.parametrize("source", ["missing/x.jsonl", "nothing.parquet", "/no/such/folder",
                                    "a/b/c"])
def test_nonexistent_local_path(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub was asked"))
    with pytest.raises(ValueError, match="does not exist"):
        load_examples(source)


def test_unsupported_local_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="expected a .jsonl or .parquet file"):
        load_examples(tmp_path / "x.csv")


def test_unreachable_hub_id(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="clevr_cogen_a_train is neither a local") as info:
        load_examples("leonardPKU/clevr_cogen_a_train")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_hub_id_goes_to_load_dataset_with_the_split(monkeypatch, tmp_path):
    calls = []

    def fake_load_dataset(source, split):
        calls.append((source, split))
        return hf_dataset(ROWS)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert_matches(load_examples("owner/name", split="test").examples, ROWS)
    assert calls == [("owner/name", "test")]


def test_question_and_answer_text():
    assert question("How many?") == "How many?  Output the thinking process in <think> </think> " \
        "and final answer (number) in <answer> </answer> tags."
    assert PROMPT_SUFFIX.startswith("  Output")
    assert answer_text("<answer> 3 </answer>") == "3"
    assert answer_text("<answer>70°</answer>") == "70°"
    assert answer_text("  42 ") == "42"
    assert answer_text("<think>a</think> <answer>\n1\n</answer>") == "1"


def components(image, background):
    """Number of 4-connected regions of pixels that differ from the background."""
    w, h = image.size
    px = image.load()
    seen, count = set(), 0
    for start in ((x, y) for y in range(h) for x in range(w)):
        if start in seen or px[start] == background:
            continue
        count += 1
        seen.add(start)
        queue = deque([start])
        while queue:
            x, y = queue.popleft()
            for nxt in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                inside = 0 <= nxt[0] < w and 0 <= nxt[1] < h
                if inside and nxt not in seen and px[nxt] != background:
                    seen.add(nxt)
                    queue.append(nxt)
    return count


def test_counting_answers_match_the_drawn_shapes():
    rows = make_counting(40, seed=1, min_objects=2, max_objects=5)
    asked_shapes = 0
    for r in rows:
        assert r["image"].mode == "RGB" and r["image"].size == (112, 112)
        assert r["task"] == "counting"
        assert components(r["image"], (128, 128, 128)) == len(r["shapes"])
        assert 2 <= len(r["shapes"]) <= 5
        if r["problem"] == "How many objects are there?":
            assert r["count"] == len(r["shapes"])
        else:
            asked_shapes += 1
            shape = r["problem"].removeprefix("How many ").removesuffix("s are there?")
            assert shape in ("circle", "square", "triangle")
            assert r["count"] == r["shapes"].count(shape) >= 1
        assert r["solution"] == f"<answer> {r['count']} </answer>"
    assert 0 < asked_shapes < 20
    assert len({r["count"] for r in rows}) >= 3
    with pytest.raises(ValueError, match="min_objects"):
        make_counting(1, min_objects=3, max_objects=2)


def test_grid_counting_puts_one_object_per_cell():
    """counting-grid (the embedded base's task): 1-5 separate objects, each inside its own
    28 px cell of the 4 x 4 grid, objects-only questions; the scattered layout is unchanged."""
    rows = data.GENERATORS["counting-grid"](60, 2)
    counts = set()
    for r in rows:
        assert r["problem"] == "How many objects are there?" and r["task"] == "counting"
        assert components(r["image"], (128, 128, 128)) == len(r["shapes"]) == r["count"]
        pixels = r["image"].load()
        occupied = {(x // 28, y // 28) for x in range(112) for y in range(112)
                    if pixels[x, y] != (128, 128, 128)}
        assert len(occupied) == r["count"]          # no object crosses into another cell
        counts.add(r["count"])
    assert counts == {1, 2, 3, 4, 5}
    again = data.GENERATORS["counting-grid"](3, 2)
    assert [png(r["image"]) for r in again] == [png(r["image"]) for r in rows[:3]]
    with pytest.raises(ValueError, match="layout"):
        make_counting(1, layout="rows")
    with pytest.raises(ValueError, match="does not fit"):
        make_counting(1, layout="grid", cells=2, max_objects=5)


def test_polygon_geometry_draws_one_dot_per_vertex():
    """geometry-polygon (geometry at embedded scale): 3-5 vertex dots, each in its own grid
    cell, joined by an outline; the answer is the interior-angle sum (k - 2) * 180."""
    rows = data.GENERATORS["geometry-polygon"](45, 3)
    sides = set()
    for r in rows:
        assert r["task"] == "geometry" and r["problem"].startswith("As shown in the figure")
        assert r["answer"] == 180 * (r["sides"] - 2)
        assert r["solution"] == f"<answer>{r['answer']}°</answer>"
        pixels = r["image"].load()
        colours = {pixels[x, y] for x in range(112) for y in range(112)} - {(128, 128, 128),
                                                                           (0, 0, 0)}
        assert len(colours) == 1                     # the dots, all one colour
        dot = colours.pop()
        mono = Image.new("RGB", (112, 112))
        mono.putdata([(255, 255, 255) if p == dot else (0, 0, 0) for p in r["image"].getdata()])
        assert components(mono, (0, 0, 0)) == r["sides"]
        sides.add(r["sides"])
    assert sides == {3, 4, 5}
    assert [png(r["image"]) for r in data.GENERATORS["geometry-polygon"](2, 3)] == \
        [png(r["image"]) for r in rows[:2]]
    with pytest.raises(ValueError, match="min_sides"):
        data.GENERATORS["geometry-polygon"](1, min_sides=2)


def test_embedded_mix_holds_both_tasks():
    rows = data.GENERATORS["embedded-mix"](40, 1)
    tasks = [r["task"] for r in rows]
    assert 10 < tasks.count("geometry") < 30 and tasks.count("counting") == 40 - \
        tasks.count("geometry")
    assert all(set(r) == {"image", "problem", "solution", "task"} for r in rows)
    assert [png(r["image"]) for r in data.GENERATORS["embedded-mix"](3, 1)] == \
        [png(r["image"]) for r in rows[:3]]


def test_geometry_answers_are_consistent():
    rows = make_geometry(40, seed=2)
    assert {r["kind"] for r in rows} == {"triangle", "supplementary"}
    for r in rows:
        assert r["task"] == "geometry" and r["problem"].startswith("As shown in the figure")
        assert len(r["given"]) == (2 if r["kind"] == "triangle" else 1)
        assert r["answer"] == 180 - sum(r["given"]) and 0 < r["answer"] < 180
        assert all(a % 5 == 0 and 0 < a < 180 for a in r["given"] + [r["answer"]])
        assert answer_text(r["solution"]) == f"{r['answer']}°"
        assert r["image"].convert("L").getextrema()[0] == 0  # something is drawn in black


@pytest.mark.parametrize("make", [make_counting, make_geometry])
def test_generators_are_deterministic(make):
    first, again, other = make(6, seed=3), make(6, seed=3), make(6, seed=4)
    key = [{k: v for k, v in r.items() if k != "image"} for r in first]
    assert key == [{k: v for k, v in r.items() if k != "image"} for r in again]
    assert [png(r["image"]) for r in first] == [png(r["image"]) for r in again]
    assert [png(r["image"]) for r in first] != [png(r["image"]) for r in other]
    assert [png(r["image"]) for r in make(3, seed=3)] == [png(r["image"]) for r in first[:3]]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_written_examples_load_back(tmp_path, suffix):
    rows = make_geometry(5, seed=0)
    path = write_examples(rows, tmp_path / "deep" / f"geo{suffix}")
    assert path.exists() and [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "plain").write_text("")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # usual permissions
    result = load_examples(path, warn=pytest.fail)
    assert [ex.image.tobytes() for ex in result.examples] == [r["image"].tobytes() for r in rows]
    assert [ex.row["answer"] for ex in result.examples] == [r["answer"] for r in rows]
    assert [ex.row["given"] for ex in result.examples] == [r["given"] for r in rows]
    if suffix == ".jsonl":
        assert json.loads(path.read_text().splitlines()[1])["image"] == "geo_images/00001.png"
    with pytest.raises(ValueError, match="expected a .jsonl or .parquet path"):
        write_examples(rows, tmp_path / "geo.csv")


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_rows_with_several_images_or_none(tmp_path, suffix):
    """The `images` column: any number of images per row, none included (text-only)."""
    rows = [{"images": [picture(i) for i in range(k)], "problem": f"q{k}",
             "solution": "<answer> 1 </answer>"} for k in (0, 1, 2, 3)]
    path = write_examples(rows, tmp_path / f"multi{suffix}")
    examples = load_examples(path, warn=pytest.fail).examples
    assert [len(ex.images) for ex in examples] == [0, 1, 2, 3]
    assert [[png(im) for im in ex.images] for ex in examples] == \
        [[png(im) for im in r["images"]] for r in rows]
    assert examples[0].image is None and png(examples[2].image) == png(picture(0))
    if suffix == ".parquet":  # a Hugging Face dataset with a list of Image features
        dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
        assert len(dataset[2]["images"]) == 2


def test_image_and_images_together_or_images_not_a_list_are_bad_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    ok = {"problem": "q", "solution": "<answer> 1 </answer>"}
    b64 = base64.b64encode(png(picture(1))).decode()
    path.write_text("\n".join(json.dumps(r) for r in [
        {**ok, "image": {"bytes": b64}, "images": [{"bytes": b64}]},
        {**ok, "images": {"bytes": b64}},
        {**ok, "images": [{"bytes": b64}]}]) + "\n")
    warnings = []
    result = load_examples(path, warn=warnings.append)
    assert len(result.examples) == 1 and result.skipped == {"wrong_type": 2}


def test_written_parquet_is_a_hugging_face_image_dataset(tmp_path):
    rows = make_counting(3, seed=0)
    path = write_examples(rows, tmp_path / "c.parquet")
    assert pq.read_schema(path).field("image").type == data.IMAGE_TYPE
    dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset[1]["image"].convert("RGB").tobytes() == rows[1]["image"].tobytes()
    assert dataset[1]["count"] == rows[1]["count"]


def test_synthetic_dataset_is_cached_and_splits_differ(tmp_path, monkeypatch):
    train = synthetic_dataset("counting", "train", 8, 0, tmp_path)
    assert train == tmp_path / "counting-train-8-seed0.parquet"
    mtime = os.stat(train).st_mtime_ns
    monkeypatch.setitem(data.GENERATORS, "counting", lambda *a: pytest.fail("regenerated"))
    assert synthetic_dataset("counting", "train", 8, 0, tmp_path) == train
    assert os.stat(train).st_mtime_ns == mtime
    monkeypatch.undo()
    test = synthetic_dataset("counting", "test", 8, 0, tmp_path)
    images = [{png(ex.image) for ex in load_examples(p).examples} for p in (train, test)]
    assert len(images[0]) > 1 and not images[0] & images[1]
    with pytest.raises(ValueError, match=re.escape(str(sorted(data.GENERATORS)))):
        synthetic_dataset("ocr", "train", 8, 0, tmp_path)


def test_resolve_source(tmp_path):
    path = resolve_source("synthetic:geometry", split="test", cache_dir=tmp_path, n=4, seed=1)
    assert path == str(tmp_path / "geometry-test-4-seed1.parquet")
    assert len(load_examples(path).examples) == 4
    assert resolve_source("leonardPKU/superclevr", split="test", cache_dir=tmp_path, n=4,
                          seed=1) == "leonardPKU/superclevr"
    with pytest.raises(ValueError, match="unknown synthetic task"):
        resolve_source("synthetic:ocr", split="train", cache_dir=tmp_path, n=4, seed=1)
