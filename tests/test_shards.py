import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from beit_lightning.data.shards import main as shards_main


def _image(seed, size, fmt):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def image_tree(tmp_path):
    """train/<class>/ with JPEGs and PNGs of various sizes, one corrupt file and one non-image."""
    root = tmp_path / "train"
    files = {}
    for c, name in enumerate(["n01440764", "n01443537", "n01484850"]):
        (root / name).mkdir(parents=True)
        for i in range(7):
            fmt, ext = ("PNG", "png") if i == 3 else ("JPEG", "JPEG")
            data = _image(c * 10 + i, (40 + 13 * i, 30 + 7 * c), fmt)
            path = root / name / f"img_{i}.{ext}"
            path.write_bytes(data)
            files[f"{name}/img_{i}.{ext}"] = (data, c)
    (root / "n01443537" / "broken.JPEG").write_bytes(_image(99, (50, 50), "JPEG")[:300])
    (root / "n01443537" / "notes.txt").write_text("not an image")
    return root, files


def _read_tars(out):
    samples = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = t.extractfile(m).read()
    return samples


def test_folder_round_trip_deterministic_and_skips_unreadable(image_tree, tmp_path, capsys):
    root, files = image_tree
    out = tmp_path / "shards"
    assert shards_main([str(root), str(out), "--samples-per-shard", "5", "--workers", "2", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "broken.JPEG" in printed.err and "skipped (unreadable): 1" in printed.out

    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 21 and [s["num_samples"] for s in index["shards"]] == [5, 5, 5, 5, 1]
    assert index["classes"] == ["n01440764", "n01443537", "n01484850"]
    assert [s["path"] for s in index["skipped"]] == ["n01443537/broken.JPEG"]
    assert (out / "classes.txt").read_text().splitlines()[1] == "1\tn01443537"

    samples = _read_tars(out)
    assert len(samples) == 21
    seen = {}
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        data, label = files[meta["path"]]
        ext = "png" if meta["path"].endswith("png") else "jpg"
        assert sample[ext] == data, "original bytes, no re-encode"
        assert int(sample["cls"]) == label and meta["class"] == index["classes"][label]
        seen[meta["path"]] = key
    assert set(seen) == set(files)
    order = [json.loads(samples[k]["json"])["path"] for k in sorted(samples)]
    assert order != sorted(order), "the order is shuffled"

    again = tmp_path / "again"
    shards_main([str(root), str(again), "--samples-per-shard", "5", "--workers", "1", "--quiet"])
    for tar in out.glob("*.tar"):
        assert tar.read_bytes() == (again / tar.name).read_bytes(), "same input, same shards"
    other_seed = tmp_path / "seed1"
    shards_main([str(root), str(other_seed), "--samples-per-shard", "5", "--seed", "1", "--quiet"])
    assert (other_seed / "shard-000000.tar").read_bytes() != (out / "shard-000000.tar").read_bytes()


def test_max_side_reencodes_large_images_and_unlabeled_trees(tmp_path):
    root = tmp_path / "photos"  # images directly in the folder: no classes
    root.mkdir(parents=True)
    (root / "big.png").write_bytes(_image(1, (300, 120), "PNG"))
    (root / "small.jpg").write_bytes(_image(2, (60, 40), "JPEG"))
    out = tmp_path / "shards"
    shards_main([str(tmp_path / "photos"), str(out), "--max-side", "100", "--quiet"])
    samples = _read_tars(out)
    sizes = {}
    for sample in samples.values():
        assert "cls" not in sample, "an unlabeled tree has no labels"
        assert set(sample) == {"jpg", "json"}
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            sizes[json.loads(sample["json"])["path"]] = img.size
    assert sizes == {"big.png": (100, 40), "small.jpg": (60, 40)}


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        shards_main([str(tmp_path / "missing"), str(tmp_path / "out"), "--quiet"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        shards_main([str(tmp_path / "empty"), str(tmp_path / "out"), "--quiet"])
