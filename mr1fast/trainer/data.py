"""Datasets in R1-V's schema, and small synthetic stand-ins for its counting and geometry tasks.

A row holds `image` (a picture) or `images` (a list of pictures, possibly empty: several images
per prompt, or a text-only prompt), `problem` (str, the question without the prompt suffix) and
`solution` (str, the answer in tags: "<answer> 3 </answer>" for counting, "<answer>70°</answer>"
for geometry). Any other columns are kept in `Example.row`.

Sources (`load_examples`): a .jsonl file, a .parquet file or a folder of them (the Hugging Face hub
layout data/<split>-*.parquet), a `datasets` save_to_disk folder, or a Hugging Face hub id.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import random
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import UserError, from_os_error

PROMPT_SUFFIX = ("  Output the thinking process in <think> </think> and final answer (number) in "
                 "<answer> </answer> tags.")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # HF Image feature
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_DISK_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def question(problem: str) -> str:
    """The prompt text of a problem: the problem followed by R1-V's format instruction."""
    return problem + PROMPT_SUFFIX


def answer_text(solution: str) -> str:
    """The content of the first <answer>...</answer> in `solution`, stripped (all of `solution`
    if it has no tags)."""
    match = _ANSWER.search(solution)
    return (match.group(1) if match else solution).strip()


@dataclass
class Example:
    images: list  # decoded, RGB PIL images, in prompt order (possibly none)
    problem: str  # stripped, without PROMPT_SUFFIX
    solution: str  # stripped
    row: dict  # every other column of the source row, as plain Python values
    index: int  # position of the row in the source (0-based, bad rows included)

    @property
    def image(self):
        """The first image (None for a text-only row)."""
        return self.images[0] if self.images else None

    def reward_row(self) -> dict:
        """The columns a reward function sees: solution, problem and the extra columns."""
        return {"solution": self.solution, "problem": self.problem, **self.row}


@dataclass
class LoadResult:
    examples: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> number of rows skipped
    source: str = ""


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def load_examples(source: str | Path, *, split: str = "train", limit: int | None = None,
                  rows: tuple[int, int | None] = (0, None), strict: bool = False,
                  max_prompt_length: int | None = None,
                  prompt_length: Callable[[Example], int] | None = None,
                  warn: Callable[[str], None] | None = None) -> LoadResult:
    """Read and validate the rows of `source` (see the module docstring for the kinds).

    Bad rows (missing or undecodable image, empty or non-str problem/solution, unparsable JSON,
    prompt_length(example) > max_prompt_length) are skipped and counted by reason, with one
    warning per reason at the end; with strict=True the first one raises ValueError instead.
    `split` picks the split of folders and hub datasets; single files ignore it. `limit` stops
    after that many valid examples. `rows` = (start, stop) reads only the source's rows with
    start <= index < stop (stop None: to the end), bad ones included in the count, so a hold-out
    of the first rows (a validation split) and the rest never share a row. Raises ValueError
    when no valid example remains.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected a positive int or None, got {limit!r}")
    start, stop = rows
    if start < 0 or (stop is not None and stop <= start):
        raise ValueError(f"rows: expected 0 <= start < stop, got {rows!r}")
    name = str(source)
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))  # at our caller
    result = LoadResult(examples=[], skipped={}, source=name)
    for index, (raw, base) in enumerate(_raw_rows(name, split)):
        if index < start:
            continue
        if stop is not None and index >= stop:
            break
        try:
            if isinstance(raw, _BadRow):
                raise raw
            example = _example(raw, index, base)
            if max_prompt_length is not None and prompt_length is not None:
                length = prompt_length(example)
                if length > max_prompt_length:
                    raise _BadRow("prompt_too_long", f"{length} > {max_prompt_length}")
        except _BadRow as bad:
            if strict:
                raise ValueError(f"source {name}: row {index}: {bad}") from bad
            result.skipped[bad.reason] = result.skipped.get(bad.reason, 0) + 1
            continue
        result.examples.append(example)
        if limit is not None and len(result.examples) >= limit:
            break
    for reason, count in result.skipped.items():
        warn(f"skipped {count} rows of {name}: {reason}")
    if not result.examples:
        where = "" if rows == (0, None) else f" in rows {start}..{'' if stop is None else stop}"
        raise ValueError(f"source {name}: no valid examples{where} (skipped rows by reason: "
                         f"{result.skipped or 'none, the source is empty'}); a row needs R1-V's "
                         "columns image (or images), problem and solution")
    return result


def _raw_rows(source: str, split: str) -> Iterator[tuple[dict | _BadRow, Path | None]]:
    """(row, folder that relative image paths are relative to) for each row of the source."""
    path = Path(source).expanduser()
    if not path.exists():
        if source.endswith((".jsonl", ".parquet")) or not _HUB_ID.fullmatch(source):
            raise ValueError(f"source {source} does not exist")
        yield from ((row, None) for row in _dataset_rows(_hub_dataset(source, split)))
    elif path.is_file() and path.suffix == ".jsonl":
        yield from ((row, path.parent) for row in _jsonl_rows(path))
    elif path.is_file() and path.suffix == ".parquet":
        yield from _parquet_rows([path])
    elif path.is_dir() and any((path / marker).exists() for marker in _DISK_MARKERS):
        yield from ((row, None) for row in _dataset_rows(_disk_dataset(path, split)))
    elif path.is_dir() and (files := sorted(path.rglob("*.parquet"))):
        # Hub layouts: data/<split>-00000-of-00001.parquet or <config>/<split>/0000.parquet.
        in_split = [f for f in files if f.name.startswith(split)
                    or split in f.relative_to(path).parts[:-1]]
        yield from _parquet_rows(in_split or files)
    else:
        raise ValueError(f"source {source}: expected a .jsonl or .parquet file, a folder of "
                         f".parquet files or a datasets save_to_disk folder")


def _jsonl_rows(path: Path) -> Iterator[dict | _BadRow]:
    """Each line decoded on its own: a line that is not UTF-8 is one bad row, and a byte-order
    mark (at the start of the file, or of a line pasted from another file) is dropped."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                yield _BadRow("bad_encoding", f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield _BadRow("bad_json", str(e))


def _parquet_rows(files: list[Path]) -> Iterator[tuple[dict, Path]]:
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
            yield from ((row, file.parent) for row in batch.to_pylist())


def _disk_dataset(path: Path, split: str):
    import datasets
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"source {path}: no split {split!r} (splits: {sorted(loaded)})")
        return loaded[split]
    return loaded


def _hub_dataset(source: str, split: str):
    import datasets
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown id, missing split: all mean "cannot use this source"
        raise ValueError(f"source {source} is neither a local JSONL/parquet/dataset folder nor a "
                         f"reachable Hugging Face hub dataset ({type(e).__name__}: {e})") from e


def _dataset_rows(dataset) -> Iterator[dict]:
    """Rows of a `datasets.Dataset` with the image left encoded, so a corrupt one is a bad row
    here instead of an exception inside the datasets iterator."""
    import datasets
    if isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    listed = dataset.features.get("images")
    inner = getattr(listed, "feature", None)
    if isinstance(inner, datasets.Image):  # a list of images (List / Sequence of Image)
        dataset = dataset.cast_column("images", type(listed)(datasets.Image(decode=False)))
    return iter(dataset)


def _example(raw: dict, index: int, base: Path | None) -> Example:
    if not isinstance(raw, dict):
        raise _BadRow("wrong_type", f"row is a {type(raw).__name__}, not an object")
    texts = {}
    for key in ("problem", "solution"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise _BadRow("wrong_type", f"{key} is a {type(value).__name__}")
        if not value or not value.strip():
            raise _BadRow(f"empty_{key}")
        texts[key] = value.strip()
    row = {k: v for k, v in raw.items() if k not in ("image", "images", "problem", "solution")}
    if raw.get("images") is not None:
        if raw.get("image") is not None:
            raise _BadRow("wrong_type", "both image and images are set")
        if not isinstance(raw["images"], (list, tuple)):
            raise _BadRow("wrong_type", f"images is a {type(raw['images']).__name__}, not a "
                                        "list")
        images = [_decode_image(v, base) for v in raw["images"]]
    else:
        images = [_decode_image(raw.get("image"), base)]
    return Example(images, texts["problem"], texts["solution"], row, index)


def _decode_image(value, base: Path | None) -> Image.Image:
    """RGB image from a PIL image, a path, bytes, or a {"bytes", "path"} dict (HF Image feature;
    in JSONL the bytes are base64 text)."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (str, bytes)):
        data, path = (None, value) if isinstance(value, str) else (value, None)
    elif value is None:
        raise _BadRow("missing_image")
    else:
        raise _BadRow("wrong_type", f"image is a {type(value).__name__}")
    if not data and not path:
        raise _BadRow("missing_image")
    try:
        if isinstance(data, str):
            data = base64.b64decode(data, validate=True)
        src = io.BytesIO(data) if data else Path(path) if base is None else base / Path(path)
        with Image.open(src) as image:
            return image.convert("RGB")  # forces the full decode inside the try
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, ...)
        raise _BadRow("bad_image", f"{type(e).__name__}: {e}") from e


# Synthetic tasks. Each row's pixels depend only on (seed, row number), never on n.

_BACKGROUND = (128, 128, 128)
_COLOURS = ((200, 40, 40), (40, 170, 60), (40, 80, 210), (230, 210, 50), (150, 60, 190),
            (40, 200, 200), (140, 90, 40))  # red, green, blue, yellow, purple, cyan, brown
_SHAPES = ("circle", "square", "triangle")


def make_counting(n: int, seed: int = 0, *, image_size: int = 112, min_objects: int = 1,
                  max_objects: int = 6, layout: str = "scattered", cells: int = 4,
                  shape_questions: float = 0.25) -> list[dict]:
    """CLEVR-like counting rows: non-overlapping circles, squares and triangles on grey.

    layout "scattered": anywhere in the image; "grid": at most one per cell of a cells x cells
    grid, near its centre (at 112 px and 4 cells, one cell is one merged Qwen2-VL image token:
    a small model learns to count these far sooner; docs/notes/embedded-base.md).
    Row: image (PIL RGB, image_size^2), problem ("How many objects are there?", or for a
    `shape_questions` share of the rows "How many <shape>s are there?"), solution
    "<answer> {count} </answer>", task "counting", count (int, the answer) and shapes
    (list[str], one name per drawn shape).
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"expected 1 <= min_objects <= max_objects, got {min_objects}, "
                         f"{max_objects}")
    if layout not in ("scattered", "grid"):
        raise ValueError(f"layout: expected 'scattered' or 'grid', got {layout!r}")
    if layout == "grid" and max_objects > cells * cells:
        raise ValueError(f"max_objects={max_objects} does not fit a {cells}x{cells} grid")
    rows = []
    for i in range(n):
        rng = random.Random(f"counting:{seed}:{i}" if layout == "scattered"
                            else f"counting-{layout}:{seed}:{i}")
        image = Image.new("RGB", (image_size, image_size), _BACKGROUND)
        draw, placed, shapes = ImageDraw.Draw(image), [], []
        count = rng.randint(min_objects, max_objects)
        spots = rng.sample(range(cells * cells), count) if layout == "grid" else [None] * count
        for cell in spots:
            if cell is None:
                x, y, r = _free_spot(rng, placed, image_size)
            else:
                c, jitter = image_size / cells, _jitter(image_size / cells)
                x, y = _cell_centre(rng, cell, cells, c)
                # inside its cell: centre offset + radius < c / 2
                r = rng.randint(max(2, round(c / 4)), max(2, int(c / 2) - jitter - 1))
            shape = rng.choice(_SHAPES)
            colour = rng.choice(_COLOURS)
            if shape == "circle":
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
            elif shape == "square":
                s = round(r * 0.75)
                draw.rectangle((x - s, y - s, x + s, y + s), fill=colour)
            else:
                draw.polygon([(x, y - r), (x - r, y + r * 0.7), (x + r, y + r * 0.7)], fill=colour)
            placed.append((x, y, r))
            shapes.append(shape)
        if rng.random() < shape_questions:
            asked = rng.choice(shapes)
            problem, count = f"How many {asked}s are there?", shapes.count(asked)
        else:
            problem, count = "How many objects are there?", len(shapes)
        rows.append({"image": image, "problem": problem, "solution": f"<answer> {count} </answer>",
                     "task": "counting", "count": count, "shapes": shapes})
    return rows


def _jitter(cell_px: float) -> int:
    return max(1, round(cell_px / 9))


def _cell_centre(rng: random.Random, cell: int, cells: int, cell_px: float) -> tuple[int, int]:
    """A point near the centre of grid cell `cell` (row-major in a cells x cells grid of
    cell_px-pixel cells), jittered by up to _jitter(cell_px) pixels each way."""
    jitter = _jitter(cell_px)
    return (round((cell % cells + 0.5) * cell_px) + rng.randint(-jitter, jitter),
            round((cell // cells + 0.5) * cell_px) + rng.randint(-jitter, jitter))


def _free_spot(rng: random.Random, placed: list, size: int) -> tuple[int, int, int]:
    """Centre and radius of a shape that keeps a 3-pixel gap from every placed one."""
    for _ in range(2000):
        r = rng.randint(max(3, size // 16), max(4, size // 10))
        x, y = rng.randint(r + 2, size - r - 3), rng.randint(r + 2, size - r - 3)
        if all(math.hypot(x - px, y - py) > r + pr + 3 for px, py, pr in placed):
            return x, y, r
    raise ValueError(f"cannot place {len(placed) + 1} separate shapes in a {size}px image: "
                     f"lower max_objects or raise image_size")


def make_geometry(n: int, seed: int = 0, *, image_size: int = 112) -> list[dict]:
    """Angle problems drawn as diagrams, all angles integer multiples of 5 degrees.

    About half the rows show a triangle with two angles labelled ("50°") and the third marked
    x; the others a ray on a straight line making two supplementary angles, one labelled, one x.
    Row: image (PIL RGB), problem "As shown in the figure, find the angle x in degrees.",
    solution "<answer>{x}°</answer>", task "geometry", kind ("triangle" or "supplementary"),
    given (list[int], the labelled angles) and answer (int, x = 180 - sum(given)).
    """
    font = ImageFont.load_default(size=max(8, image_size // 10))
    rows = []
    for i in range(n):
        rng = random.Random(f"geometry:{seed}:{i}")
        image = Image.new("RGB", (image_size, image_size), "white")
        draw = ImageDraw.Draw(image)
        if rng.random() < 0.5:
            kind, angles = "triangle", _triangle_angles(rng)
            corners = _triangle(angles, image_size)
            draw.polygon(corners, outline="black", width=2)
            wedges = [(corners[k], (corners[k - 1], corners[(k + 1) % 3]), angles[k])
                      for k in range(3)]
            unknown = 2
        else:
            kind, ray = "supplementary", rng.randrange(30, 155, 5)
            o = (image_size / 2, image_size * 0.7)
            arm = image_size * 0.42
            left, right = (o[0] - arm, o[1]), (o[0] + arm, o[1])
            t = math.radians(ray)
            end = (o[0] + arm * math.cos(t), o[1] - arm * math.sin(t))
            draw.line((left, right), fill="black", width=2)
            draw.line((o, end), fill="black", width=2)
            wedges = [(o, (right, end), ray), (o, (end, left), 180 - ray)]
            unknown = rng.randrange(2)
        for k, (vertex, ends, angle) in enumerate(wedges):
            _label_angle(draw, vertex, ends, angle, "x" if k == unknown else f"{angle}°", font,
                         image_size)
        given = [angle for k, (_, _, angle) in enumerate(wedges) if k != unknown]
        x = 180 - sum(given)
        rows.append({"image": image,
                     "problem": "As shown in the figure, find the angle x in degrees.",
                     "solution": f"<answer>{x}°</answer>", "task": "geometry", "kind": kind,
                     "given": given, "answer": x})
    return rows


def make_polygon_angles(n: int, seed: int = 0, *, image_size: int = 112, cells: int = 4,
                        min_sides: int = 3, max_sides: int = 5) -> list[dict]:
    """Geometry an embedded-scale model can learn: the sum of a polygon's interior angles,
    (k - 2) * 180 degrees for k vertices, which needs the vertices counted (each a coloured dot
    in its own cell of a cells x cells grid: at 112 px one merged image token, as in counting's
    grid layout) and the rule applied. The vertices are joined in angular order around their
    centroid (a simple polygon; a vertex on a straight edge still counts, at 180 degrees).
    Row: image, problem "As shown in the figure, find the sum of the interior angles of the
    polygon in degrees.", solution "<answer>{sum}°</answer>", task "geometry", kind "polygon",
    sides (k) and answer (int)."""
    if not 3 <= min_sides <= max_sides <= cells * cells:
        raise ValueError(f"expected 3 <= min_sides <= max_sides <= {cells * cells}, got "
                         f"{min_sides}, {max_sides}")
    rows = []
    for i in range(n):
        rng = random.Random(f"geometry-polygon:{seed}:{i}")
        image = Image.new("RGB", (image_size, image_size), _BACKGROUND)
        draw = ImageDraw.Draw(image)
        k = rng.randint(min_sides, max_sides)
        c = image_size / cells
        corners = [_cell_centre(rng, cell, cells, c)
                   for cell in rng.sample(range(cells * cells), k)]
        cx, cy = sum(x for x, _ in corners) / k, sum(y for _, y in corners) / k
        corners.sort(key=lambda p: math.atan2(p[1] - cy, p[0] - cx))
        draw.polygon(corners, outline=(0, 0, 0), width=1)
        colour, r = rng.choice(_COLOURS), max(2, round(c / 5))
        for x, y in corners:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        total = 180 * (k - 2)
        rows.append({"image": image, "problem": "As shown in the figure, find the sum of the "
                     "interior angles of the polygon in degrees.",
                     "solution": f"<answer>{total}°</answer>", "task": "geometry",
                     "kind": "polygon", "sides": k, "answer": total})
    return rows


def make_embedded_mix(n: int, seed: int = 0, *, geometry_share: float = 0.5) -> list[dict]:
    """The embedded base's pre-training set (mr1fast/trainer/base.py): grid counting and
    polygon geometry rows, each row's task drawn with probability `geometry_share` for
    geometry. Only the columns both tasks share are kept (image, problem, solution, task)."""
    rows = []
    for i in range(n):
        geometry = random.Random(f"embedded-mix:{seed}:{i}").random() < geometry_share
        row = (make_polygon_angles(1, seed=zlib.crc32(f"{seed}:{i}".encode())) if geometry else
               GENERATORS["counting-grid"](1, seed=zlib.crc32(f"{seed}:{i}".encode())))[0]
        rows.append({k: row[k] for k in ("image", "problem", "solution", "task")})
    return rows


def _triangle_angles(rng: random.Random) -> list[int]:
    """[a, b, x], each in [35, 100] degrees (no flat triangles to crowd the labels), sum 180."""
    a = rng.randrange(35, 105, 5)
    b = rng.randrange(max(35, 80 - a), min(100, 145 - a) + 1, 5)
    return [a, b, 180 - a - b]


def _triangle(angles: list[int], size: int) -> list[tuple[float, float]]:
    """Corners (A, B, C) in pixels with angles[0] at A (bottom left) and angles[1] at B (bottom
    right), scaled to fill the image less a margin."""
    a, b, c = (math.radians(t) for t in angles)
    side = math.sin(b) / math.sin(c)  # AC by the law of sines, with AB = 1
    points = [(0.0, 0.0), (1.0, 0.0), (side * math.cos(a), side * math.sin(a))]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    margin = size * 0.08
    scale = (size - 2 * margin) / max(max(xs) - min(xs), max(ys) - min(ys))
    return [(margin + (px - min(xs)) * scale, size - margin - (py - min(ys)) * scale)
            for px, py in points]


def _label_angle(draw: ImageDraw.ImageDraw, vertex, ends, angle: int, text: str, font,
                 size: int) -> None:
    """Write `text` inside the angle at `vertex` between the rays towards the two `ends`, on its
    bisector and far enough out to clear both rays (further for sharper angles)."""
    x, y = vertex
    units = [((ex - x) / math.hypot(ex - x, ey - y), (ey - y) / math.hypot(ex - x, ey - y))
             for ex, ey in ends]
    bx, by = units[0][0] + units[1][0], units[0][1] + units[1][1]
    norm = math.hypot(bx, by)
    distance = min(max(size / 8 / math.sin(math.radians(angle) / 2), size / 7), size / 3)
    draw.text((x + distance * bx / norm, y + distance * by / norm), text, fill="black", font=font,
              anchor="mm")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_examples(rows: list[dict], path: str | Path) -> Path:
    """Write rows whose `image` is a PIL image (or whose `images` is a list of them) to `path`,
    atomically; returns the path.

    .jsonl: one object per line, each image a path relative to the file, saved as
    <stem>_images/NNNNN[_k].png beside it. .parquet: each image as {bytes: PNG, path: None},
    the Hugging Face Image feature (declared in the schema metadata, so `datasets` decodes it).
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"write_examples: expected a .jsonl or .parquet path, got {path}")
    key = "images" if rows and "images" in rows[0] else "image"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic
    try:
        if path.suffix == ".parquet":
            table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != key}
                                          for r in rows])
            if key == "image":
                column = pa.array([{"bytes": _png(r["image"]), "path": None} for r in rows],
                                  IMAGE_TYPE)
                feature = {"_type": "Image"}
            else:
                column = pa.array([[{"bytes": _png(im), "path": None} for im in r["images"]]
                                   for r in rows], pa.list_(IMAGE_TYPE))
                feature = {"_type": "Sequence", "feature": {"_type": "Image"}}
            table = table.add_column(0, key, column).replace_schema_metadata(
                {"huggingface": json.dumps({"info": {"features": {key: feature}}})})
            pq.write_table(table, tmp)
        else:
            folder = path.parent / f"{path.stem}_images"
            folder.mkdir(exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                for i, r in enumerate(rows):
                    if key == "image":
                        r["image"].save(folder / f"{i:05d}.png")
                        saved = f"{folder.name}/{i:05d}.png"
                    else:
                        saved = []
                        for k, im in enumerate(r["images"]):
                            im.save(folder / f"{i:05d}_{k}.png")
                            saved.append(f"{folder.name}/{i:05d}_{k}.png")
                    f.write(json.dumps({**r, key: saved},
                                       ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


GENERATORS = {"counting": make_counting, "geometry": make_geometry,
              # the embedded base's counting (docs/notes/embedded-base.md): 1-5 objects, one per
              # cell of a 4 x 4 grid, "How many objects are there?" only
              "counting-grid": functools.partial(make_counting, layout="grid", max_objects=5,
                                                 shape_questions=0.0),
              # geometry at embedded scale: a polygon's interior-angle sum (3-5 vertices)
              "geometry-polygon": make_polygon_angles,
              # the embedded base's pre-training: both of the above, half and half
              "embedded-mix": make_embedded_mix}


def synthetic_dataset(task: str, split: str, n: int, seed: int, cache_dir: Path) -> Path:
    """Path of a cached parquet of n synthetic `task` rows, generated on first use. The generator
    seed mixes in the split, so the train and test splits of one seed hold different images."""
    if task not in GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(GENERATORS)}")
    path = Path(cache_dir) / f"{task}-{split}-{n}-seed{seed}.parquet"
    if not path.exists():
        write_examples(GENERATORS[task](n, zlib.crc32(f"{split}:{seed}".encode())), path)
    return path


def resolve_source(source: str, *, split: str, cache_dir: Path, n: int, seed: int) -> str:
    """"synthetic:<task>" -> the path of its cached synthetic dataset (n rows of `split`);
    any other source unchanged."""
    if source.startswith("synthetic:"):
        task = source.removeprefix("synthetic:")
        return str(synthetic_dataset(task, split, n, seed, cache_dir))
    return source


def cache_path(cache_dir: str) -> Path:
    """The cache folder (tiny models, synthetic data): $MR1FAST_CACHE, else `cache_dir`."""
    return Path(os.path.expanduser(os.environ.get("MR1FAST_CACHE", cache_dir)))


def load_task(source: str, cfg, encoder, *, key: str, split: str, n: int, limit: int,
              max_prompt_length: int | None, strict: bool,
              warn: Callable[[str], None] = print,
              rows: tuple[int, int | None] = (0, None)) -> list[Example]:
    """Examples of one data source (synthetic:* names generate and cache `n` rows), with rows
    whose prompt exceeds max_prompt_length tokens (image tokens included, counted by
    `encoder.prompt_length`) skipped; `rows` as in load_examples. `cfg` gives the cache folder
    and the seed. A source that
    cannot be used raises a UserError naming the config `key` it came from."""
    try:
        path = resolve_source(source, split=split, cache_dir=cache_path(cfg.cache_dir) / "data",
                              n=n, seed=cfg.seed)
        result = load_examples(path, split=split, limit=limit or None, rows=rows, strict=strict,
                               max_prompt_length=max_prompt_length,
                               prompt_length=lambda e: encoder.prompt_length(
                                   e.images, question(e.problem)),
                               warn=warn)
    except ValueError as e:
        raise UserError(f"{key}={source!r} (split {split!r}): {e}",
                        fix="check the path, the split and the columns (image, problem, "
                            "solution)") from None
    except OSError as e:
        raise from_os_error(e, f"reading {key}={source!r}") or e
    return result.examples


class DataOrder:
    """Batches of `per_step` examples in a seeded per-epoch permutation; the position (epoch,
    offset) is part of a checkpoint, so a resumed run sees the same batches."""

    def __init__(self, n: int, per_step: int, seed: int, epoch: int = 0, offset: int = 0):
        if n < per_step:
            raise ValueError(f"{n} examples are fewer than the {per_step} needed per step")
        self.n, self.per_step, self.seed = n, per_step, seed
        self.restore(epoch, offset)

    def restore(self, epoch: int, offset: int) -> None:
        self.epoch, self.offset = epoch, offset

    def next(self) -> list[int]:
        if self.offset + self.per_step > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        batch = order[self.offset: self.offset + self.per_step].tolist()
        self.offset += self.per_step
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}
