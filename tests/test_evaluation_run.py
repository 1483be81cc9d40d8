"""One evaluation for main.py's final table and test.py (lib.evaluation.run), one embedding cache key."""
import json

import pytest
import torch

import main as main_module
import test as test_module
from lib.cache import EmbeddingCache
from lib.checkpoint import atomic_save, network_state
from lib.config import Config
from lib.data.splits import load_split
from lib.evaluation.clustering import clustering_metrics
from lib.evaluation.run import SETTINGS, resolve_test_subset, row_titles, table_settings
from lib.extract import cached_extract, embedding_key, eval_transform, extract
from lib.models import build_network


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    student = build_network("resnet18", "gem", 16, pretrained=False, image_size=32)
    teacher = build_network("resnet18", "gem", 16, pretrained=False, image_size=48)
    atomic_save(network_state(student), folder / "s.pth")
    atomic_save(network_state(teacher), folder / "t.pth")
    return folder / "s.pth", folder / "t.pth"


def test_main_and_test_py_share_rows_and_cache_entries(tiny_dataset, tmp_path, nets):
    student_path, teacher_path = nets
    spec = f"folder:{tiny_dataset}-test"
    cache = EmbeddingCache(tmp_path / "cache")
    cfg = Config(test_datasets=spec, image_size=32, teacher_image_size=48, workers=0)
    teacher = main_module.load_network(str(teacher_path))
    from_main = main_module.final_test(cfg, student_path, teacher, device=torch.device("cpu"), run_dir=tmp_path,
                                       cache=cache)[spec]
    entries = sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))
    assert len(entries) == 2  # the teacher at the database size and at the query size (naive row)
    out = test_module.main(["--student-path", str(student_path), "--teacher-path", str(teacher_path),
                            "--datasets", spec, "--workers", "0", "--sym", "--no-cost",
                            "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "t.json")])
    # test.py reads main.py's teacher embeddings: no entry of its own
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.pt")) == entries
    from_test = out["datasets"][spec]
    titles = row_titles(32, 48)
    assert list(from_main) == [titles[k] for k in SETTINGS]  # main.py's printed rows, in order
    assert set(from_test) == set(SETTINGS)
    for key, title in titles.items():
        for metric in ("mAP", "R@1", "mAP/T"):
            assert from_test[key][metric] == from_main[title][metric], (key, metric)


def test_amp_enters_the_cache_key_batch_size_does_not(tiny_dataset, tmp_path, nets):
    net = main_module.load_network(str(nets[1]))
    paths = load_split(f"folder:{tiny_dataset}", "data").subset("test")[0][:6]
    cache = EmbeddingCache(tmp_path)
    full = cached_extract(cache, net, paths, 32, amp="none", batch_size=4)
    bf16 = cached_extract(cache, net, paths, 32, amp="bf16", batch_size=4)
    assert cache.misses == 2 and len(list(tmp_path.glob("*.pt"))) == 2
    assert not torch.equal(full, bf16)  # bf16 autocast changes the values: it must not read float32's entry
    again = cached_extract(cache, net, paths, 32, amp=None, batch_size=2)  # None is 'none'; batch size: rounding only
    assert cache.hits == 1 and torch.equal(again, full)
    assert torch.allclose(extract(net, paths, 32, batch_size=2), full, atol=1e-5)


def test_key_holds_the_transforms_own_description(nets):
    net = main_module.load_network(str(nets[1]))
    key = embedding_key(net, ["a.png"], 32)
    assert key["transform"] == eval_transform(net, 32).describe()
    assert "size=32" in key["transform"] and str(net.meta["mean"]) in key["transform"]
    assert embedding_key(net, ["a.png"], 32, pooled=True) != key
    # where the network was loaded from does not change its embeddings, so not the key either
    net.meta["checkpoint"] = "elsewhere.pth"
    net.meta["image_size"] = 999
    assert embedding_key(net, ["a.png"], 32) == key


def test_subset_resolution_and_settings():
    assert resolve_test_subset("cub") == ("cub", "test")
    assert resolve_test_subset("cub-train") == ("cub", "train")  # an explicit suffix is what the user asked for
    assert resolve_test_subset("cub-val") == ("cub", "val")
    assert list(table_settings(teacher=True)) == ["teacher", "naive", "asym", "sym"]
    assert list(table_settings(teacher=True, naive=False, sym=False)) == ["teacher", "asym"]
    assert list(table_settings(teacher=False)) == ["sym"]


def test_test_py_clustering_of_each_rows_own_embeddings(tiny_dataset, tmp_path, nets):
    student_path, teacher_path = nets
    spec = f"folder:{tiny_dataset}-test"
    out = test_module.main(["--student-path", str(student_path), "--teacher-path", str(teacher_path),
                            "--datasets", spec, "--workers", "0", "--sym", "--no-cost", "--clustering",
                            "--cache-dir", "", "--output", str(tmp_path / "t.json")])
    rows = out["datasets"][spec]
    assert "NMI" not in rows["asym"] and "NMI" not in rows["naive"]  # two embeddings: no single clustering
    paths, labels = load_split(f"folder:{tiny_dataset}", "data").subset("test")
    labels = torch.as_tensor(labels)
    student, teacher = main_module.load_network(str(student_path)), main_module.load_network(str(teacher_path))
    expected = {"sym": clustering_metrics(extract(student, paths, 32), labels),
                "teacher": clustering_metrics(extract(teacher, paths, 48), labels)}
    assert expected["sym"]["NMI"] != expected["teacher"]["NMI"]
    for row, metrics in expected.items():
        assert rows[row]["NMI"] == pytest.approx(metrics["NMI"], abs=1e-9)
        assert rows[row]["F1"] == pytest.approx(metrics["F1"], abs=1e-9)
    json.loads((tmp_path / "t.json").read_text())
