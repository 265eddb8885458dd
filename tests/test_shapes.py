"""The shapes data set (grammar, split, determinism, files) and the classifier that scores a model on it."""
import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm.data.shapes import (COLOURS, HELD_OUT_TRIPLES, POSITIONS, SHAPES, SIZES, ShapesDataset, ShapeSpec,
                             all_specs, render, split, write_folder)
from ldm.demo.eval import ATTRIBUTES, classify, evaluate, eval_specs, make_grid, report_table, score

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accuracy(pairs) -> dict[str, float]:
    return {a: v for a, v in score(pairs).items() if a != "n"}


def degrade(image: Image.Image, rng: np.random.Generator, blur_first: bool) -> np.ndarray:
    """N(0, 8) noise per channel and a 3x3 box blur, in either order."""
    def noise(a):
        return np.clip(np.rint(np.asarray(a, dtype=np.float32) + rng.normal(0, 8, a.shape)), 0, 255).astype(np.uint8)

    def blur(a):
        return np.asarray(Image.fromarray(np.asarray(a)).filter(ImageFilter.BoxBlur(1)))

    a = np.asarray(image)
    return noise(blur(a)) if blur_first else blur(noise(a))


# ------------------------------------------------------------------------------------------ grammar, split


def test_grammar_enumerates_1008_captions_that_parse_back():
    specs = all_specs()
    assert len(specs) == 2 * 8 * 3 * 3 * 7 == 1008
    assert len({s.caption for s in specs}) == 1008
    assert all(s.colour != s.background for s in specs)
    assert all(ShapeSpec.parse(s.caption) == s for s in specs)
    spec = ShapeSpec("large", "red", "circle", "left", "blue")
    assert spec.caption == "large red circle on the left, blue background"
    assert (len(all_specs("train")), len(all_specs("heldout"))) == (912, 96)


@pytest.mark.parametrize("caption", [
    "large red circle on the left, red background",     # colour == background
    "Large red circle on the left, blue background",    # case
    "large red circle on the left, blue background ",   # trailing space
    "large red circle on the left blue background",     # missing comma
    "a large red circle on the left, blue background",  # extra word
    "huge red circle on the left, blue background",
    "large pink circle on the left, blue background",
    "large red hexagon on the left, blue background",
    "large red circle on the top, blue background",
    "large red circle on the left, teal background",
    "",
])
def test_parse_rejects_anything_off_grammar(caption):
    with pytest.raises(ValueError):
        ShapeSpec.parse(caption)


def test_held_out_triples_are_balanced_and_each_of_their_parts_is_seen_in_training():
    assert len(HELD_OUT_TRIPLES) == 16
    colours, shapes, backgrounds = zip(*HELD_OUT_TRIPLES)
    assert Counter(colours) == Counter(backgrounds) == {c: 2 for c in COLOURS}
    assert set(shapes) == set(SHAPES)
    train = {s.triple for s in all_specs("train")}
    for c, s, b in HELD_OUT_TRIPLES:
        assert c != b
        assert any(t[:2] == (c, s) for t in train)
        assert any((t[0], t[2]) == (c, b) for t in train)
        assert any(t[1:] == (s, b) for t in train)


def test_held_out_triples_never_reach_the_train_split():
    train = ShapesDataset("train", n=2000, seed=3)
    heldout = ShapesDataset("heldout", seed=3)
    assert not {s.triple for s in train.specs} & HELD_OUT_TRIPLES
    assert {s.triple for s in heldout.specs} == HELD_OUT_TRIPLES
    assert all(split(ShapeSpec.parse(train[i]["caption"])) == "train" for i in range(0, 2000, 7))
    assert all(split(ShapeSpec.parse(heldout[i]["caption"])) == "heldout" for i in range(len(heldout)))
    assert len(ShapesDataset("all")) == 1008


# --------------------------------------------------------------------------------------- rendering, data set


def test_render_is_exact_and_keeps_shapes_whole():
    spec = ShapeSpec("large", "red", "square", "center", "blue")
    a = np.asarray(render(spec))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert tuple(a[32, 32]) == COLOURS["red"] and tuple(a[0, 0]) == COLOURS["blue"]
    assert (a == COLOURS["red"]).all(-1).sum() == 32 * 32  # the 32-px square sits on the pixel grid
    # the widest jitter on the left edge moves the shape back inside the frame instead of clipping it
    for shape, fill in (("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)):
        s = ShapeSpec("large", "white", shape, "left", "black")
        a = np.asarray(render(s, jitter=(-2.0, 2.0, 1.1))).astype(np.float32)
        coverage = (a[..., 0] - 20) / (245 - 20)
        assert coverage.sum() == pytest.approx(fill * (32 * 1.1) ** 2, rel=0.01)


def test_dataset_is_deterministic_and_sample_i_ignores_order_and_length():
    a, b = ShapesDataset("train", n=40, seed=5), ShapesDataset("train", n=40, seed=5)
    forward = [a[i] for i in range(40)]
    backward = [b[i] for i in reversed(range(40))][::-1]
    for x, y in zip(forward, backward):
        assert x["caption"] == y["caption"] and torch.equal(x["image"], y["image"])
    longer = ShapesDataset("train", n=5000, seed=5)
    assert torch.equal(longer[17]["image"], a[17]["image"]) and longer[17]["caption"] == a[17]["caption"]
    other = ShapesDataset("train", n=40, seed=6)
    assert [other[i]["caption"] for i in range(40)] != [x["caption"] for x in forward]
    assert render(a.specs[0]).tobytes() == render(a.specs[0]).tobytes()
    with pytest.raises(IndexError):
        a[40]


def test_dataset_items_collate_to_image_tensors_in_unit_range():
    data = ShapesDataset("train", n=8, seed=0)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    no_jitter = ShapesDataset("train", n=1, seed=0, jitter=False)
    spec, image = no_jitter.sample(0)
    assert image.tobytes() == render(spec).tobytes()


def test_write_folder_pairs_pngs_captions_and_metadata(tmp_path):
    out = tmp_path / "shapes"
    assert write_folder(out, "train", n=12, seed=1) == 12
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    data = ShapesDataset("train", n=12, seed=1)
    assert [r["file_name"] for r in rows] == [f"{i:06d}.png" for i in range(12)]
    for i, row in enumerate(rows):
        spec, image = data.sample(i)
        assert row["text"] == spec.caption == (out / row["file_name"]).with_suffix(".txt").read_text()
        assert np.array_equal(np.asarray(Image.open(out / row["file_name"])), np.asarray(image))
    again = tmp_path / "again"
    write_folder(again, "train", n=12, seed=1)
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in ("metadata.jsonl", "000011.png"))


def test_write_folder_refuses_a_non_empty_folder_and_overwrite_removes_only_its_files(tmp_path):
    write_folder(tmp_path, "heldout", n=5)
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError):
        write_folder(tmp_path, "heldout", n=3)
    write_folder(tmp_path, "heldout", n=3, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000000.png", "000000.txt", "000001.png", "000001.txt", "000002.png", "000002.txt", "metadata.jsonl",
        "notes.md"]


def test_make_shapes_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    tool = load_tool("demo")
    out = tmp_path / "d"
    assert tool.main(["make-shapes", "--out", str(out), "--n", "4", "--split", "heldout"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    before = (out / "metadata.jsonl").read_bytes()
    assert tool.main(["make-shapes", "--out", str(out), "--n", "4", "--seed", "9"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "metadata.jsonl").read_bytes() == before
    assert tool.main(["make-shapes", "--out", str(out), "--n", "4", "--seed", "9", "--force"]) == 0
    assert (out / "metadata.jsonl").read_bytes() != before


# --------------------------------------------------------------------------------------------- classifier


def test_classifier_reads_every_clean_spec():
    pairs = [(s, classify(render(s))) for s in all_specs()]
    assert [s.caption for s, p in pairs if p != {a: getattr(s, a) for a in ATTRIBUTES}] == []


def test_classifier_reads_every_jittered_spec():
    data = ShapesDataset("all", seed=0)
    pairs = [(spec, classify(image)) for spec, image in map(data.sample, range(len(data)))]
    assert accuracy(pairs) == dict.fromkeys((*ATTRIBUTES, "all"), 1.0)


@pytest.mark.parametrize("blur_first", [False, True])
def test_classifier_survives_noise_and_blur(blur_first):
    data = ShapesDataset("all", n=400, seed=11)
    rng = np.random.default_rng(0)
    pairs = [(spec, classify(degrade(image, rng, blur_first))) for spec, image in map(data.sample, range(400))]
    acc = accuracy(pairs)
    assert acc["colour"] == acc["background"] == acc["size"] == acc["position"] == 1.0
    assert acc["shape"] >= 0.99  # small yellow-on-orange squares, blurred then noised, are the hardest


def test_classifier_is_independent_of_image_size_and_handles_a_blank_image():
    for s in all_specs()[::97]:
        assert classify(render(s, image_size=128)) == {a: getattr(s, a) for a in ATTRIBUTES}
    blank = np.full((64, 64, 3), COLOURS["green"], dtype=np.uint8)
    assert classify(blank) == {"size": None, "colour": None, "shape": None, "position": None, "background": "green"}
    with pytest.raises(ValueError):
        classify(np.zeros((64, 64), dtype=np.uint8))


def test_score_and_report_table():
    s = ShapeSpec("small", "red", "circle", "left", "blue")
    right = {a: getattr(s, a) for a in ATTRIBUTES}
    scores = score([(s, right), (s, {**right, "shape": "square"}), (s, {**right, "colour": None})])
    assert scores["n"] == 3 and scores["size"] == 1.0 and scores["shape"] == pytest.approx(2 / 3)
    assert scores["all"] == pytest.approx(1 / 3)
    table = report_table(scores, score([]))
    assert "| shape | 66.7% | - | >= 90% | no |" in table and "| images | 3 | 0 | | |" in table


def test_evaluate_calls_generate_in_batches_with_each_prompts_seed():
    seen, heldout = eval_specs(10, seed=0)
    assert len(seen) == 10 and len(heldout) == 96 and all(split(s) == "train" for s in seen)
    assert eval_specs(10, seed=0) == (seen, heldout) and eval_specs(10, seed=1)[0] != seen
    calls = []

    def generate(prompts, seeds):
        calls.append(seeds)
        return [render(ShapeSpec.parse(p)) if k % 2 else Image.new("RGB", (64, 64), COLOURS["white"])
                for p, k in zip(prompts, seeds)]

    records = evaluate(generate, seen, list(range(10)), batch_size=4)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert score(records)["all"] == 0.5
    assert make_grid(records, columns=5).size[0] == 5 * (2 * 64 + 8)


def test_eval_shapes_dataset_mode_reports_100_percent(tmp_path, capsys):
    tool = load_tool("demo")
    assert tool.main(["eval", "--dataset", "--n-seen", "24", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "| shape | 100.0% | 100.0% | >= 90% | yes |" in out
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["seen"]["n"] == 24 and scores["heldout"]["all"] == 1.0
    with pytest.raises(SystemExit) as e:
        tool.main(["eval", "--help"])
    assert e.value.code == 0


def test_palette_and_vocabulary_match_the_issue():
    assert COLOURS["red"] == (230, 40, 40) and COLOURS["black"] == (20, 20, 20) and len(COLOURS) == 8
    assert SIZES == {"small": 16, "large": 32} and POSITIONS == {"left": 0.25, "center": 0.5, "right": 0.75}
    assert SHAPES == ("circle", "square", "triangle")
