"""Splits (official layouts, custom forms, validation), image loading and the embedded dataset."""
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.data import splits as S  # noqa: E402
from lib.data.datasets import ImageList, ImageLoadError, image_size, load_image, verify_images  # noqa: E402
from lib.data.splits import (  # noqa: E402
    DATASETS, DatasetSplit, carve_val, load_split, load_split_json, parse_dataset_spec, register_dataset,
    save_split_json, split_summary, trainval, validate_split,
)

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def tiny_image(path: Path, value: int = 0, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((6, 5, 3), value % 256, np.uint8)
    array[0, 0] = (value * 7) % 256  # distinct images
    Image.fromarray(array).save(path, format=fmt)


def all_paths(split, keys=("train", "val", "test")):
    return [p for k in keys for c in split[k] for p in c]


def assert_disjoint(split):
    paths = all_paths(split)
    assert len(paths) == len(set(paths))


# ---------------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 98, 100, 11318])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7])
def test_carve_val_follows_the_reference_int_rule(n, ratio):
    classes = [[f"c{i}"] for i in range(n)]
    train, val = carve_val(classes, ratio)
    expected = int(round(n * (1 - ratio), 9))  # reference: classes[:int(n * (1 - val_ratio))]
    assert train == classes[:expected] and val == classes[expected:]


def test_carve_val_examples_and_bad_ratio():
    assert [len(x) for x in carve_val(list(range(5)), 0.5)] == [2, 3]      # int(2.5) = 2 train
    assert [len(x) for x in carve_val(list(range(100)), 0.5)] == [50, 50]
    assert [len(x) for x in carve_val(list(range(10)), 0.9)] == [1, 9]     # not int(0.999...) = 0
    for bad in (-0.1, 1.0, 1.5, "0.5", None):
        with pytest.raises(ValueError, match="val_ratio"):
            carve_val([[1]], bad)


def test_parse_dataset_spec():
    assert parse_dataset_spec("cub-test") == ("cub", "test")
    assert parse_dataset_spec("cub-val") == ("cub", "val")
    assert parse_dataset_spec("cub") == ("cub", "train")
    assert parse_dataset_spec("cub-train") == ("cub", "train")
    assert parse_dataset_spec("fashion-mnist-mini-test") == ("fashion-mnist-mini", "test")
    assert parse_dataset_spec("fashion-mnist") == ("fashion-mnist", "train")
    assert parse_dataset_spec("inshop-query") == ("inshop", "query")
    assert parse_dataset_spec("folder:/a/b-c-test") == ("folder:/a/b-c", "test")
    assert parse_dataset_spec("splits/x.json-val") == ("splits/x.json", "val")
    with pytest.raises(ValueError):
        parse_dataset_spec("  ")


def test_trainval_merges_in_order_and_keeps_test():
    split = {"train": [["a"], ["b"]], "val": [["c"]], "test": [["d"]], "val_ratio": 0.5}
    merged = trainval(split)
    assert merged["train"] == [["a"], ["b"], ["c"]] and merged["val"] == [] and merged["test"] == [["d"]]
    assert split["train"] == [["a"], ["b"]]  # not mutated
    assert trainval({"train": [["a"]], "test": [["d"]]})["train"] == [["a"]]


def test_split_summary_counts_singletons():
    summary = split_summary({"train": [["a", "b"]], "val": [], "test": [["c"], ["d", "e", "f"]]})
    assert summary["test"] == {"classes": 2, "images": 4, "singletons": 1}
    assert summary["val"] == {"classes": 0, "images": 0, "singletons": 0}


def test_save_and_load_split_json_round_trip(tmp_path):
    split = {"name": "x", "val_ratio": 0.5, "train": [["a", "b"]], "val": [], "test": [["c"]]}
    save_split_json(split, tmp_path / "d" / "x.json")
    assert load_split_json(tmp_path / "d" / "x.json") == split
    assert not [p for p in (tmp_path / "d").iterdir() if p.name != "x.json"]  # no temporary left


# ---------------------------------------------------------------------------------------------------
# validation: every bad input names the entry
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split, pattern", [
    ([["a"]], "a split must be a JSON object"),
    ({"test": [["a"]]}, "missing the 'train' subset"),
    ({"train": [["a"]]}, "missing the 'test' subset"),
    ({"train": "a", "test": [["b"]]}, "subset 'train' must be a list of classes"),
    ({"train": [["a"]], "val": {"x": 1}, "test": [["b"]]}, "subset 'val' must be a list"),
    ({"train": [["a"], "b"], "test": [["c"]]}, "subset 'train' class 1 must be a list of image paths"),
    ({"train": [["a"]], "test": [["b", 3]]}, "subset 'test' class 0: image path must be a non-empty string, got 3"),
    ({"train": [["a"]], "test": [["b", ""]]}, "subset 'test' class 0: image path must be a non-empty string"),
    ({"train": [["a"], []], "test": [["b"]]}, "subset 'train' class 1 is empty"),
    ({"train": [["a", "b"], ["b"]], "test": [["c"]]}, "subset 'train' holds 'b' twice \\(classes 0 and 1\\)"),
    ({"train": [["a"]], "val": [["v"]], "test": [["c"], ["v"]]},
     "'v' is in subset 'val' class 0 and in subset 'test' class 1"),
    ({"train": [["a"]], "test": [["b"]], "query": [["b", "b"]]}, "subset 'query' holds 'b' twice"),
])
def test_validate_split_rejects_bad_structure(split, pattern):
    with pytest.raises(ValueError, match=f"^my.json: {pattern}"):
        validate_split(split, None, name="my.json")


def test_validate_split_allows_singletons_and_empty_view_classes():
    validate_split({"train": [["a"]], "val": [], "test": [["b"], ["c"]], "query": [["b"], []],
                    "gallery": [[], ["c"]], "name": "meta", "classes": ["x", "y"]}, None)


def test_validate_split_missing_file_names_subset_class_path(tmp_path):
    tiny_image(tmp_path / "a.png")
    tiny_image(tmp_path / "b.png")
    split = {"train": [["a.png"]], "test": [["b.png"], ["gone/c.png", "gone/d.png"]]}
    with pytest.raises(FileNotFoundError, match=r"^s.json: subset 'test' class 1: image 'gone/c.png' not found "
                                                r"under root .* \(2 of 4 images missing\)"):
        validate_split(split, tmp_path, name="s.json")
    validate_split(split, tmp_path, check_files=False)


def test_load_split_json_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_split(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": [["a"]], ')
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_split(str(bad))
    bad.write_text('[["a"], ["b"]]')
    with pytest.raises(ValueError, match="bad.json.*expected a JSON object"):
        load_split(str(bad))
    bad.write_text(json.dumps({"train": [["a.png"]], "test": [[]]}))
    with pytest.raises(ValueError, match="split file '.*bad.json': subset 'test' class 0 is empty"):
        load_split(str(bad), data_root=str(tmp_path))
    bad.write_text(json.dumps({"train": [["a.png"]], "test": [["b.png"]]}))
    with pytest.raises(FileNotFoundError, match="split file '.*bad.json': subset 'train' class 0: image 'a.png'"):
        load_split(str(bad), data_root=str(tmp_path))
    bad.write_text(json.dumps({"root": 3, "train": [["a.png"]], "test": [["b.png"]]}))
    with pytest.raises(ValueError, match='"root" must be a non-empty string'):
        load_split(str(bad))


def test_unknown_dataset_lists_registered_names_and_other_forms(tmp_path):
    with pytest.raises(ValueError) as e:
        load_split("no-such-dataset", data_root=str(tmp_path), splits_dir=str(tmp_path))
    message = str(e.value)
    for needle in ("no-such-dataset", "cub", "cars", "sop", "inshop", "fashion-mnist-mini", "JSON", "folder:"):
        assert needle in message
    with pytest.raises(FileNotFoundError, match="folder"):
        load_split(f"folder:{tmp_path / 'absent'}")
    with pytest.raises(FileNotFoundError, match="no such split file or folder"):
        load_split(str(tmp_path / "absent" / "dir"))


def test_subset_unknown_name():
    with pytest.raises(ValueError, match="no subset 'query'.*train, val, test"):
        DatasetSplit("x", "/r", {"train": [["a"]], "val": [], "test": [["b"]]}).subset("query")


# ---------------------------------------------------------------------------------------------------
# custom datasets: JSON file, class folder, @register_dataset
# ---------------------------------------------------------------------------------------------------

def test_json_split_relative_to_data_root_or_its_root_key(tmp_path):
    data = tmp_path / "data"
    classes = [[f"shoes/c{c}/{i}.png" for i in range(2)] for c in range(6)]
    for i, p in enumerate(p for c in classes for p in c):
        tiny_image(data / p, i)
    path = tmp_path / "mine.json"
    save_split_json({"train": classes[:4], "test": classes[4:]}, path)
    ds = load_split(str(path), data_root=str(data), val_ratio=0.5)
    assert ds.name == "mine" and ds.split["train"] == classes[:2] and ds.split["val"] == classes[2:4]
    paths, labels = ds.subset("test")
    assert paths == [str(data / p) for c in classes[4:] for p in c] and labels == [0, 0, 1, 1]
    # an explicit val is kept as it is; a "root" key (relative to the JSON's folder) overrides data_root
    save_split_json({"root": "data/shoes", "train": [[p[6:] for p in c] for c in classes[:3]],
                     "val": [[p[6:] for p in classes[3]]], "test": [[p[6:] for p in c] for c in classes[4:]]}, path)
    ds = load_split(str(path), data_root="/nonexistent", val_ratio=0.5)
    assert len(ds.split["train"]) == 3 and len(ds.split["val"]) == 1
    assert ds.subset("val")[0] == [str(data / p) for p in classes[3]]
    # a stored val_ratio that differs from the requested one is re-carved
    save_split_json({"val_ratio": 0.5, "train": classes[:2], "val": classes[2:4], "test": classes[4:]}, path)
    assert len(load_split(str(path), data_root=str(data), val_ratio=0.25).split["train"]) == 3


def test_folder_of_class_folders(tmp_path):
    root = tmp_path / "shoes"
    for c in ["b_boot", "a_sandal", "d_slipper", "c_sneaker", "e_clog"]:
        for i in range(3):
            tiny_image(root / c / f"{i}.jpg", i, "JPEG")
    (root / "a_sandal" / "notes.txt").write_text("not an image")
    for spec in (f"folder:{root}", str(root)):
        ds = load_split(spec, val_ratio=0.5)
        assert ds.root == str(root) and ds.name == "shoes"
        # sorted classes, first half (rounded up: 3) train -> carve int(3 * 0.5) = 1 train, 2 val; 2 test
        assert [c[0].split("/")[0] for c in ds.split["train"]] == ["a_sandal"]
        assert [c[0].split("/")[0] for c in ds.split["val"]] == ["b_boot", "c_sneaker"]
        assert [c[0].split("/")[0] for c in ds.split["test"]] == ["d_slipper", "e_clog"]
        assert ds.split["train"][0] == ["a_sandal/0.jpg", "a_sandal/1.jpg", "a_sandal/2.jpg"]
        assert_disjoint(ds.split)
    (root / "f_empty").mkdir()
    with pytest.raises(ValueError, match="f_empty.*holds no images"):
        load_split(f"folder:{root}")


def test_folder_needs_two_classes(tmp_path):
    tiny_image(tmp_path / "only" / "a" / "0.png")
    with pytest.raises(ValueError, match="at least 2 class"):
        load_split(f"folder:{tmp_path / 'only'}")


@pytest.fixture
def custom_name():
    name = "unit-test-custom"
    yield name
    DATASETS.pop(name, None)
    S._INFO.pop(name, None)


def test_register_dataset_builder_is_cached(tmp_path, custom_name):
    data, splits_dir = tmp_path / "data", tmp_path / "splits"
    calls = []

    @register_dataset(custom_name, folders=("absent", "mine"))
    def build(root, val_ratio):
        calls.append(root)
        classes = [[f"{c}/{i}.png" for i in range(2)] for c in range(8)]
        train, val = carve_val(classes[:4], val_ratio)
        return {"train": train, "val": val, "test": classes[4:]}

    for c in range(8):
        for i in range(2):
            tiny_image(data / "mine" / f"{c}/{i}.png", c * 2 + i)
    ds = load_split(custom_name, data_root=str(data), splits_dir=str(splits_dir))
    assert calls == [str(data / "mine")] and ds.root == str(data / "mine")  # first existing folder
    assert (len(ds.split["train"]), len(ds.split["val"]), len(ds.split["test"])) == (2, 2, 4)
    cached = load_split_json(splits_dir / f"{custom_name}.json")
    assert cached["train"] == ds.split["train"] and cached["val_ratio"] == 0.5
    same = load_split(custom_name, data_root=str(data), splits_dir=str(splits_dir))
    assert len(calls) == 1 and same.split["train"] == ds.split["train"]  # read from the cache
    again = load_split(custom_name, data_root=str(data), splits_dir=str(splits_dir), val_ratio=0.25)
    assert len(calls) == 2  # another ratio rebuilds, and re-caches
    assert (len(again.split["train"]), len(again.split["val"])) == (3, 1)
    assert load_split_json(splits_dir / f"{custom_name}.json")["val_ratio"] == 0.25
    load_split(custom_name, data_root=str(data), splits_dir=str(splits_dir), val_ratio=0.25)
    assert len(calls) == 2
    with pytest.raises(KeyError, match="registered twice"):
        register_dataset(custom_name)(build)


# ---------------------------------------------------------------------------------------------------
# official layouts (fake copies)
# ---------------------------------------------------------------------------------------------------

def make_cub(root: Path, class_ids=(1, 2, 3, 4, 101, 102, 103), per_class=2):
    lines, n = [], 0
    for cid in sorted(class_ids, reverse=True):  # file order must not matter: class order is by id
        for i in range(per_class):
            n += 1
            rel = f"{cid:03d}.Bird_{cid}/Bird_{cid}_{i}.jpg"
            tiny_image(root / "images" / rel, n, "JPEG")
            lines.append(f"{n} {rel}")
    (root / "images.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("folder", ["cub", "CUB_200_2011"])
def test_cub_builder(tmp_path, folder):
    make_cub(tmp_path / "data" / folder)
    ds = load_split("cub", data_root=str(tmp_path / "data"), splits_dir=str(tmp_path / "splits"))
    assert ds.root == str(tmp_path / "data" / folder)
    ids = lambda key: [int(c[0].split("/")[1][:3]) for c in ds.split[key]]  # noqa: E731
    assert ids("train") == [1, 2] and ids("val") == [3, 4] and ids("test") == [101, 102, 103]
    assert ds.split["test"][0] == ["images/101.Bird_101/Bird_101_0.jpg", "images/101.Bird_101/Bird_101_1.jpg"]
    assert_disjoint(ds.split)
    assert (tmp_path / "splits" / "cub.json").is_file()


def test_cub_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="images.txt"):
        load_split("cub", data_root=str(tmp_path), splits_dir=str(tmp_path / "s"))
    (tmp_path / "cub").mkdir()
    (tmp_path / "cub" / "images.txt").write_text("1 001.A/x.jpg\n2 Bird/y.jpg\n")
    with pytest.raises(ValueError, match="images.txt' line 2: path 'Bird/y.jpg'"):
        load_split("cub", data_root=str(tmp_path), splits_dir=str(tmp_path / "s"))
    assert not (tmp_path / "s" / "cub.json").exists()  # nothing cached from a failed build


def make_cars(root: Path, class_ids=(1, 2, 3, 4, 98, 99, 100, 196)):
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    rows = [(cid, i) for cid in class_ids for i in range(2)]
    rows = rows[1::2] + rows[0::2]  # not sorted by class
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for k, (cid, i) in enumerate(rows):
        rel = f"car_ims/{k + 1:06d}.jpg"
        tiny_image(root / rel, k, "JPEG")
        annotations[0, k] = (np.array([rel]), np.array([[1]], np.uint8), np.array([[2]], np.uint8),
                             np.array([[30]], np.uint16), np.array([[20]], np.uint16),
                             np.array([[cid]], np.uint8), np.array([[i % 2]], np.uint8))
    savemat(root / "cars_annos.mat", {"annotations": annotations,
                                      "class_names": np.array([[f"car {c}" for c in class_ids]], dtype=object)})
    return rows


def test_cars_builder(tmp_path):
    rows = make_cars(tmp_path / "cars")
    ds = load_split("cars", data_root=str(tmp_path), splits_dir=str(tmp_path / "splits"), val_ratio=0.5)
    by_class = {}
    for k, (cid, _) in enumerate(rows):
        by_class.setdefault(cid, []).append(f"car_ims/{k + 1:06d}.jpg")
    train_ids = [1, 2, 3, 4, 98]  # classes 1..98, carved: int(5 * 0.5) = 2 train
    assert ds.split["train"] == [by_class[c] for c in train_ids[:2]]
    assert ds.split["val"] == [by_class[c] for c in train_ids[2:]]
    assert ds.split["test"] == [by_class[c] for c in (99, 100, 196)]
    assert_disjoint(ds.split)


def test_cars_bad_mat(tmp_path):
    from scipy.io import savemat

    (tmp_path / "cars").mkdir()
    savemat(tmp_path / "cars" / "cars_annos.mat", {"something": np.zeros(3)})
    with pytest.raises(ValueError, match="cars_annos.mat.*annotations"):
        load_split("cars", data_root=str(tmp_path), splits_dir=str(tmp_path / "s"))


def make_sop(root: Path):
    header = "image_id class_id super_class_id path\n"
    train = [(11, "bicycle"), (11, "bicycle"), (3, "chair"), (7, "sofa"), (3, "chair"), (5, "lamp")]
    test = [(20, "mug"), (21, "mug"), (20, "mug"), (22, "kettle")]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        lines = []
        for n, (cid, sup) in enumerate(rows, 1):
            rel = f"{sup}_final/{cid}_{name[5:-4]}_{n}.JPG"
            tiny_image(root / rel, n + cid, "JPEG")
            lines.append(f"{n} {cid} 1 {rel}")
        (root / name).write_text(header + "\n".join(lines) + "\n")


def test_sop_builder_cache_and_recarve(tmp_path):
    make_sop(tmp_path / "sop")
    kw = dict(data_root=str(tmp_path), splits_dir=str(tmp_path / "splits"))
    ds = load_split("sop", **kw)
    cls = lambda key: [int(c[0].split("/")[1].split("_")[0]) for c in ds.split[key]]  # noqa: E731
    assert cls("train") == [11, 3] and cls("val") == [7, 5] and cls("test") == [20, 21, 22]  # file order
    assert ds.split["train"][0] == ["bicycle_final/11_train_1.JPG", "bicycle_final/11_train_2.JPG"]
    assert ds.subset("train")[1] == [0, 0, 1, 1]
    # the cached JSON is read from now on, even without the official files
    os.unlink(tmp_path / "sop" / "Ebay_train.txt")
    cached = load_split("sop", **kw)
    assert cached.split == ds.split
    # another val_ratio rebuilds from the official files (here gone: the error names the file)
    with pytest.raises(FileNotFoundError, match="Ebay_train.txt"):
        load_split("sop", val_ratio=0.25, **kw)
    make_sop(tmp_path / "sop")
    recarved = load_split("sop", val_ratio=0.25, **kw)
    assert len(recarved.split["train"]) == 3 and len(recarved.split["val"]) == 1
    assert trainval(recarved.split)["train"] == trainval(ds.split)["train"]
    assert load_split_json(tmp_path / "splits" / "sop.json")["val_ratio"] == 0.25
    ds = load_split("sop", **kw)
    # a missing image is reported against the cached split file
    os.unlink(tmp_path / "sop" / ds.split["test"][1][0])
    with pytest.raises(FileNotFoundError, match="cached split .*sop.json.*subset 'test' class 1"):
        load_split("sop", **kw)


def test_sop_malformed_line(tmp_path):
    (tmp_path / "sop").mkdir()
    (tmp_path / "sop" / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 2 3\n")
    (tmp_path / "sop" / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n")
    with pytest.raises(ValueError, match="Ebay_train.txt' line 2"):
        load_split("sop", data_root=str(tmp_path), splits_dir=str(tmp_path / "s"))


def test_inshop_builder_query_gallery(tmp_path):
    root = tmp_path / "inshop"
    rows = [("id_01", "train"), ("id_02", "train"), ("id_01", "train"), ("id_03", "train"),
            ("id_10", "query"), ("id_10", "gallery"), ("id_11", "gallery"), ("id_10", "gallery"),
            ("id_12", "query"), ("id_12", "gallery"), ("id_11", "gallery")]
    lines = []
    for n, (item, status) in enumerate(rows):
        rel = f"img/WOMEN/Dresses/{item}/{n:02d}_front.jpg"
        tiny_image(root / rel, n, "JPEG")
        lines.append(f"{rel} {item} {status}")
    (root / "list_eval_partition.txt").write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n"
                                                  + "\n".join(lines) + "\n")
    ds = load_split("inshop", data_root=str(tmp_path), splits_dir=str(tmp_path / "splits"))
    p = lambda n: f"img/WOMEN/Dresses/{rows[n][0]}/{n:02d}_front.jpg"  # noqa: E731
    assert ds.split["train"] == [[p(0), p(2)]] and ds.split["val"] == [[p(1)], [p(3)]]
    assert ds.split["query"] == [[p(4)], [], [p(8)]]
    assert ds.split["gallery"] == [[p(5), p(7)], [p(6), p(10)], [p(9)]]
    assert ds.split["test"] == [[p(4), p(5), p(7)], [p(6), p(10)], [p(8), p(9)]]
    q, ql = ds.subset("query")
    g, gl = ds.subset("gallery")
    assert ql == [0, 2] and gl == [0, 0, 1, 1, 2] and not set(q) & set(g)
    assert_disjoint(ds.split)
    assert load_split("inshop", data_root=str(tmp_path), splits_dir=str(tmp_path / "splits")).split == ds.split


def write_idx(path: Path, array: np.ndarray, compress: bool = True):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def make_fmnist(root: Path, compress=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ext = "-ubyte.gz" if compress else "-ubyte"
    labels = {"train": np.tile(np.arange(10), 2)[::-1].copy(), "t10k": np.arange(10)}
    images = {k: rng.integers(0, 256, (len(v), 28, 28)).astype(np.uint8) for k, v in labels.items()}
    for part in ("train", "t10k"):
        write_idx(root / f"{part}-images-idx3{ext}", images[part], compress)
        write_idx(root / f"{part}-labels-idx1{ext}", labels[part], compress)
    return np.concatenate([images["train"], images["t10k"]]), np.concatenate([labels["train"], labels["t10k"]])


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_builder_materialises_pngs(tmp_path, compress, monkeypatch):
    monkeypatch.setattr(S, "FASHION_MNIST_SYSTEM_DIRS", ())
    images, labels = make_fmnist(tmp_path / "data" / "fashion-mnist", compress)
    kw = dict(data_root=str(tmp_path / "data"), splits_dir=str(tmp_path / "splits"))
    ds = load_split("fashion-mnist", **kw)
    assert [len(c) for c in ds.split["train"] + ds.split["val"] + ds.split["test"]] == [3] * 10
    assert [{p.split("/")[1] for p in c} for c in ds.split["train"] + ds.split["val"]] == [{str(c)} for c in range(5)]
    assert [{p.split("/")[1] for p in c} for c in ds.split["test"]] == [{str(c)} for c in range(5, 10)]
    assert len(ds.split["train"]) == 2  # int(5 * 0.5)
    for path in all_paths(ds.split):  # images/<label>/<part>_<index>.png, train images first
        part, index = Path(path).stem.split("_")
        assert labels[int(index) + (20 if part == "t10k" else 0)] == int(Path(path).parent.name)
    assert ds.split["train"][0] == ["images/0/train_00009.png", "images/0/train_00019.png", "images/0/t10k_00000.png"]
    index = 25  # a t10k image (pooled index 20 + 5)
    png = Path(ds.root) / f"images/{labels[index]}/t10k_{index - 20:05d}.png"
    assert np.array_equal(np.asarray(Image.open(png)), images[index])
    assert np.array_equal(np.asarray(load_image(png))[..., 1], images[index])
    # idempotent: existing files are kept, a deleted one is written again
    mtime = png.stat().st_mtime_ns
    os.unlink(tmp_path / "splits" / "fashion-mnist.json")
    os.unlink(Path(ds.root) / ds.split["test"][0][0])
    assert load_split("fashion-mnist", **kw).split == ds.split
    assert png.stat().st_mtime_ns == mtime and (Path(ds.root) / ds.split["test"][0][0]).is_file()
    assert not list(Path(ds.root).rglob("*.tmp"))


def test_fashion_mnist_missing_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "FASHION_MNIST_SYSTEM_DIRS", ("/nonexistent/system/fmnist",))
    with pytest.raises(FileNotFoundError, match=f"looked in: {tmp_path / 'fashion-mnist'}, /nonexistent/system/fmnist"):
        load_split("fashion-mnist", data_root=str(tmp_path), splits_dir=str(tmp_path / "s"))


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "a").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="'.*a'.*payload has 3 bytes.*says 5"):
        S.read_idx(tmp_path / "a")
    (tmp_path / "b").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="not an IDX file"):
        S.read_idx(tmp_path / "b")


# ---------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------

def test_load_image_modes_as_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "l.png")), np.repeat(gray[..., None], 3, 2))

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)     # opaque red
    rgba[0, 1] = (0, 0, 255, 0)       # transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)       # half black over white -> ~127
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(load_image(tmp_path / "rgba.png")).astype(int)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    assert np.all(np.abs(out[1, 0] - 127) <= 1)

    la = Image.fromarray(np.stack([gray, np.where(gray > 100, 255, 0).astype(np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    out = np.asarray(load_image(tmp_path / "la.png"))
    assert np.array_equal(out[..., 0], np.where(gray > 100, gray, 255))

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [200, 100, 50]]]
    palette.save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").mode == "RGB"

    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    out = np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)
    assert out.shape == (3, 3, 3) and out[1, 1, 0] > 200 and out[1, 1, 1] < 60

    sixteen = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert np.asarray(load_image(tmp_path / "i16.png"))[..., 2].tolist() == [[0, 100, 255]]

    Image.fromarray(np.array([[True, False]])).save(tmp_path / "one.png")
    assert np.asarray(load_image(tmp_path / "one.png"))[0, :, 0].tolist() == [255, 0]

    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f.tiff")
    assert np.asarray(load_image(tmp_path / "f.tiff"))[0, :, 0].tolist() == [0, 128, 255]


def test_load_image_errors_name_the_path(tmp_path):
    with pytest.raises(ImageLoadError, match="'.*missing.png' not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageLoadError, match="garbage.jpg.*UnidentifiedImageError"):
        load_image(tmp_path / "garbage.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(tmp_path / "truncated.png")
    tiny_image(tmp_path / "full.jpg", 3, "JPEG")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_image(tmp_path / "truncated.jpg")
    assert issubclass(ImageLoadError, OSError)

    good = [tmp_path / "full.png", tmp_path / "full.jpg"]
    bad = [tmp_path / "truncated.png", tmp_path / "garbage.jpg", tmp_path / "missing.png", tmp_path / "truncated.jpg"]
    for workers in (1, 3):
        report = verify_images([str(p) for p in good + bad], workers=workers)
        assert [r[0] for r in report] == [str(p) for p in bad]
        assert all(str(p) in reason for p, reason in report)


def test_image_size_reads_the_header_like_load_image(tmp_path):
    Image.fromarray(np.zeros((7, 11), np.uint8)).save(tmp_path / "l.png")
    Image.fromarray(np.zeros((5, 9, 3), np.uint8)).save(tmp_path / "rgb.jpg")
    for name in ("l.png", "rgb.jpg"):
        assert image_size(tmp_path / name) == load_image(tmp_path / name).size
    with pytest.raises(ImageLoadError, match="'.*missing.png' not found"):
        image_size(tmp_path / "missing.png")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageLoadError, match="garbage.jpg.*UnidentifiedImageError"):
        image_size(tmp_path / "garbage.jpg")


def test_image_list(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, p in enumerate(paths):
        tiny_image(p, i * 50)
    ds = ImageList([str(p) for p in paths], [4, 5, 6], transform=lambda im: np.asarray(im)[0, 1, 0])
    state = torch.random.get_rng_state()
    assert len(ds) == 3 and ds[1] == (50, 5, 1)
    assert torch.equal(state, torch.random.get_rng_state())
    image, label, index = ImageList(paths)[2]
    assert image.mode == "RGB" and label == -1 and index == 2
    batch = next(iter(torch.utils.data.DataLoader(ImageList(paths, transform=lambda im: torch.zeros(1)), batch_size=3)))
    assert batch[1].tolist() == [-1, -1, -1] and batch[2].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="3 paths but 2 labels"):
        ImageList(paths, [0, 1])
    with pytest.raises(ImageLoadError, match="nope.png"):
        ImageList([tmp_path / "nope.png"])[0]


# ---------------------------------------------------------------------------------------------------
# the embedded default dataset
# ---------------------------------------------------------------------------------------------------

def test_committed_fashion_mnist_mini_loads_and_validates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found through the repository, whatever the working directory
    committed = (ROOT / "splits" / "fashion-mnist-mini.json").read_bytes()
    ds = load_split("fashion-mnist-mini")
    assert Path(ds.root).resolve() == (ROOT / "data" / "fashion-mnist-mini").resolve()
    assert ds.summary() == {"train": {"classes": 2, "images": 400, "singletons": 0},
                            "val": {"classes": 3, "images": 600, "singletons": 0},
                            "test": {"classes": 5, "images": 1000, "singletons": 0}}
    assert_disjoint(ds.split)
    folders = [[{p.split("/")[0] for p in c} for c in ds.split[k]] for k in ("train", "val", "test")]
    assert folders == [[{"0_T-shirt_top"}, {"1_Trouser"}], [{"2_Pullover"}, {"3_Dress"}, {"4_Coat"}],
                       [{"5_Sandal"}, {"6_Shirt"}, {"7_Sneaker"}, {"8_Bag"}, {"9_Ankle_boot"}]]
    paths, labels = ds.subset("test")
    assert len(paths) == 1000 and labels[0] == 0 and labels[-1] == 4
    image = load_image(paths[0])
    assert image.size == (28, 28) and image.mode == "RGB"
    assert not verify_images(paths[::40], workers=2)
    # the committed JSON is what the builder gives at 0.5; another ratio re-carves from the class folders
    assert load_split("fashion-mnist-mini", splits_dir=str(tmp_path / "s")).split == ds.split
    assert (tmp_path / "s" / "fashion-mnist-mini.json").read_bytes() == committed
    other = load_split("fashion-mnist-mini", val_ratio=0.2, splits_dir=str(tmp_path / "s"))
    assert [len(other.split[k]) for k in ("train", "val", "test")] == [4, 1, 5]
    assert (ROOT / "splits" / "fashion-mnist-mini.json").read_bytes() == committed
    assert len(trainval(ds.split)["train"]) == 5
    size = sum(p.stat().st_size for p in (ROOT / "data" / "fashion-mnist-mini").rglob("*") if p.is_file())
    assert size < 3e6
    assert "Zalando" in (ROOT / "data" / "fashion-mnist-mini" / "README.md").read_text()


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_embedded_data_is_reproducible(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import make_embedded_data

    split = make_embedded_data.build([str(DEBIAN_FMNIST)], tmp_path / "mini", tmp_path / "mini.json", per_class=200)
    committed = load_split_json(ROOT / "splits" / "fashion-mnist-mini.json")
    assert split == committed
    assert (tmp_path / "mini.json").read_bytes() == (ROOT / "splits" / "fashion-mnist-mini.json").read_bytes()
    for path in all_paths(committed)[::97]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "mini" / path)),
                              np.asarray(Image.open(ROOT / "data" / "fashion-mnist-mini" / path)))
