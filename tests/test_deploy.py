"""Deployment: export round-trips, the sharded index (kill and resume), search against brute force,
the refusal of a mismatched student/teacher pair."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import export as export_script
import index as index_script
import search as search_script
from conftest import make_class_folder
from lib.checkpoint import atomic_save, load_checkpoint, network_fingerprint, network_state
from lib.data.datasets import ImageList
from lib.data.transforms import EvalTransform
from lib.deploy import index as index_module
from lib.deploy.export import export_onnx, export_torchscript, load_exported, read_onnx_contract
from lib.deploy.index import BACKENDS, build_index, load_index, make_backend
from lib.deploy.inputs import collect_images, from_paths
from lib.deploy.search import PairMismatchError, check_pair, load_query_encoder, search_embeddings
from lib.extract import extract
from lib.models import build_network



def tiny_net(dim=16, seed=0, size=32):
    torch.manual_seed(seed)
    net = build_network("resnet18", "gem", dim, pretrained=False, image_size=size).eval()
    return net


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = make_class_folder(tmp_path_factory.mktemp("deploy") / "gallery", num_classes=3, per_class=4, size=40)
    # one non-square image: the resize rule (shorter side, centre crop) must travel with the export
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 52, 3)).astype(np.uint8)).save(root / "class00" / "wide.png")
    return root


def save_student(net, path, teacher=None):
    extra = {"teacher_fingerprint": network_fingerprint(teacher)} if teacher is not None else {}
    atomic_save(network_state(net, **extra), path)
    return path


def test_export_round_trips_onnx_and_torchscript(tmp_path, images):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    net, teacher = tiny_net(), tiny_net(seed=1, size=48)
    paths = from_paths([str(images)]).paths
    reference = extract(net, paths, 32)
    batch = torch.stack([ImageList(paths, transform=EvalTransform(32, net.meta["mean"], net.meta["std"]))[i][0]
                         for i in range(len(paths))])
    onnx_contract = export_onnx(net, tmp_path / "s.onnx", 32, teacher_fingerprint=network_fingerprint(teacher))
    export_torchscript(net, tmp_path / "s.pt", 32, teacher_fingerprint=network_fingerprint(teacher))
    for name in ("s.onnx", "s.pt"):
        model = load_exported(tmp_path / name)
        assert torch.allclose(model(batch), reference, atol=1e-5, rtol=0), name
        assert torch.allclose(model(batch[:1]), reference[:1], atol=1e-5, rtol=0)  # dynamic batch
        # the exported file alone reproduces the pipeline: its contract drives the preprocessing
        encoder = load_query_encoder(str(tmp_path / name))
        assert torch.allclose(encoder.encode(paths, batch_size=5), reference, atol=1e-5, rtol=0)
        assert encoder.teacher_fingerprint == network_fingerprint(teacher)
    # the contract in the files themselves, read with the plain libraries
    contract = read_onnx_contract(tmp_path / "s.onnx")
    assert contract == json.loads(json.dumps(onnx_contract))
    assert (contract["image_size"], contract["embedding_dim"], contract["mean"], contract["std"]) == (
        32, 16, net.meta["mean"], net.meta["std"])
    assert contract["resize"]["shorter_side"] == 37 and contract["resize"]["crop"] == "center"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32] and not isinstance(session.get_inputs()[0].shape[0], int)
    extra = {"contract.json": ""}
    with pytest.warns(FutureWarning) if torch.__version__ >= "2.9" else _nothing():
        scripted = torch.jit.load(str(tmp_path / "s.pt"), _extra_files=extra)
    assert json.loads(extra["contract.json"])["teacher_fingerprint"] == network_fingerprint(teacher)
    assert torch.allclose(scripted(batch), reference, atol=1e-5, rtol=0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_export_script_checks_and_writes_both(tmp_path):
    pytest.importorskip("onnxruntime")
    net, teacher = tiny_net(), tiny_net(seed=1)
    ckpt = save_student(net, tmp_path / "student.pth", teacher)
    out = export_script.main([str(ckpt), "--output", str(tmp_path / "exp" / "student")])
    assert set(out["files"]) == {"onnx", "torchscript"}
    assert out["contract"]["teacher_fingerprint"] == network_fingerprint(teacher)
    with pytest.raises(SystemExit, match="formats"):
        export_script.main([str(ckpt), "--output", str(tmp_path / "x"), "--formats", "tflite"])


def test_index_is_resumable_after_a_kill(tmp_path, images, monkeypatch):
    net = tiny_net(size=48)
    gallery = collect_images([str(images)])
    assert len(gallery) == 13
    whole = build_index(net, gallery, tmp_path / "whole", 48, shard_size=4, progress=False)
    assert whole["complete"] and whole["embedded_now"] == 13

    class Killed(RuntimeError):
        pass

    calls = []
    real_extract = index_module.extract

    def dying_extract(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3:
            raise Killed("killed in the third shard")
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(index_module, "extract", dying_extract)
    with pytest.raises(Killed):
        build_index(net, gallery, tmp_path / "idx", 48, shard_size=4, progress=False)
    shards = sorted(p.name for p in (tmp_path / "idx" / "shards").iterdir())
    assert shards == ["00000.pt", "00001.pt"]  # no partial file, no temporary left behind
    with pytest.raises(ValueError, match="incomplete"):
        load_index(tmp_path / "idx")
    calls.clear()
    resumed = build_index(net, gallery, tmp_path / "idx", 48, shard_size=4, progress=False)
    assert calls == [4, 1] and resumed["embedded_now"] == 5  # only the two missing shards
    index, reference = load_index(tmp_path / "idx"), load_index(tmp_path / "whole")
    assert torch.equal(index.embeddings, reference.embeddings) and index.ids == reference.ids
    assert torch.allclose(index.embeddings, extract(net, gallery.paths, 48), atol=1e-6)
    assert index.fingerprint == network_fingerprint(net) and index.ids[0] == "class00/img0.png"
    # a damaged shard is embedded again; another network is refused without --overwrite
    (tmp_path / "idx" / "shards" / "00001.pt").write_bytes(b"garbage")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["complete"] = False
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    calls.clear()
    build_index(net, gallery, tmp_path / "idx", 48, shard_size=4, progress=False)
    assert calls == [4] and torch.equal(load_index(tmp_path / "idx").embeddings, reference.embeddings)
    monkeypatch.setattr(index_module, "extract", real_extract)
    with pytest.raises(ValueError, match="fingerprint.*--overwrite"):
        build_index(tiny_net(seed=3, size=48), gallery, tmp_path / "idx", 48, shard_size=4, progress=False)
    build_index(tiny_net(seed=3, size=48), gallery, tmp_path / "idx", 48, shard_size=4, progress=False, overwrite=True)
    assert load_index(tmp_path / "idx").fingerprint == network_fingerprint(tiny_net(seed=3))


def brute_force(queries, db, k):
    sims = queries @ db.T
    return torch.argsort(sims, dim=1, descending=True, stable=True)[:, :k].numpy(), sims


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backends_equal_brute_force_ranking(name):
    if name != "torch":
        pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(600, 16, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(9, 16, generator=generator), dim=1)
    expected, sims = brute_force(queries, db, 10)
    # the approximate ones searched exhaustively must be exact; their defaults must be close
    exhaustive = {"torch": dict(chunk=64), "flat": {}, "hnsw": dict(ef_search=600), "ivf": dict(nlist=8, nprobe=8)}[name]
    scores, rows = make_backend(name, db, **exhaustive).search(queries, 10)
    assert np.array_equal(rows, expected)
    assert np.allclose(scores, np.take_along_axis(sims.numpy(), expected, 1), atol=1e-5)
    if name in ("hnsw", "ivf"):
        _, rows = make_backend(name, db).search(queries, 10)
        recall = np.mean([len(set(r) & set(e)) / 10 for r, e in zip(rows, expected)])
        assert recall >= 0.8
    _, rows = make_backend(name, db[:5]).search(queries, 10)  # k beyond the database: all of it
    assert rows.shape == (9, 5)


def test_search_command_pairs_and_refuses(tmp_path, images, capsys):
    teacher, student = tiny_net(size=48), tiny_net(seed=1)
    teacher_ckpt = tmp_path / "teacher.pth"
    atomic_save(network_state(teacher), teacher_ckpt)
    student_ckpt = save_student(student, tmp_path / "student.pth", teacher)
    index_script.main([str(images), "--teacher-path", str(teacher_ckpt), "--index", str(tmp_path / "idx"),
                       "--shard-size", "5"])
    queries = [str(images / "class01"), str(images / "class02" / "img3.png")]
    out = search_script.main(["--index", str(tmp_path / "idx"), "--student", str(student_ckpt), "-k", "4",
                              "--output", str(tmp_path / "hits.json"), *queries])
    assert out["pairing"] == "asymmetric" and json.loads((tmp_path / "hits.json").read_text()) == json.loads(json.dumps(out))
    paths = from_paths(queries).paths
    expected, sims = brute_force(extract(student, paths, 32), extract(teacher, from_paths([str(images)]).paths, 48), 4)
    index = load_index(tmp_path / "idx")
    for result, rows, row_sims in zip(out["results"], expected, sims):
        assert [h["id"] for h in result["hits"]] == [index.ids[r] for r in rows]
        assert [h["path"] for h in result["hits"]] == [index.paths[r] for r in rows]
        assert np.allclose([h["score"] for h in result["hits"]], row_sims[rows].numpy(), atol=1e-5)
    assert out["results"][-1]["query"] == "class02/img3.png"

    # another teacher's index: refused, naming both sides
    other = tmp_path / "other.pth"
    atomic_save(network_state(tiny_net(seed=2, size=48)), other)
    index_script.main([str(images), "--teacher-path", str(other), "--index", str(tmp_path / "other_idx")])
    with pytest.raises(SystemExit, match="refused: .*distilled against teacher .*another embedding space"):
        search_script.main(["--index", str(tmp_path / "other_idx"), "--student", str(student_ckpt), *queries])
    # another dimension: refused
    narrow = save_student(tiny_net(dim=8, seed=1), tmp_path / "narrow.pth", teacher)
    with pytest.raises(SystemExit, match="8 dimensions .* 16-dimensional"):
        search_script.main(["--index", str(tmp_path / "idx"), "--student", str(narrow), *queries])
    # no recorded teacher: refused unless trusted; a mismatch is never trusted
    unpaired = save_student(student, tmp_path / "unpaired.pth")
    with pytest.raises(SystemExit, match="records no teacher fingerprint.*--trust-pair"):
        search_script.main(["--index", str(tmp_path / "idx"), "--student", str(unpaired), *queries])
    trusted = search_script.main(["--index", str(tmp_path / "idx"), "--student", str(unpaired), "--trust-pair",
                                  "-o", str(tmp_path / "t.json"), *queries])
    assert trusted["pairing"] == "trusted"
    with pytest.raises(SystemExit, match="refused"):
        search_script.main(["--index", str(tmp_path / "other_idx"), "--student", str(student_ckpt), "--trust-pair",
                            *queries])
    # the student's own index is one space (symmetric search)
    build_index(student, from_paths([str(images)]), tmp_path / "sym_idx", 32, progress=False)
    assert check_pair(load_query_encoder(str(unpaired)), load_index(tmp_path / "sym_idx")) == "symmetric"
    with pytest.raises(PairMismatchError):
        check_pair(load_query_encoder(str(student_ckpt)), load_index(tmp_path / "other_idx"))


def test_search_with_onnx_student_and_approximate_backend(tmp_path, images):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("faiss")
    teacher, student = tiny_net(size=48), tiny_net(seed=1)
    teacher_ckpt = tmp_path / "teacher.pth"
    atomic_save(network_state(teacher), teacher_ckpt)
    student_ckpt = save_student(student, tmp_path / "student.pth", teacher)
    export_script.main([str(student_ckpt), "--output", str(tmp_path / "student"), "--formats", "onnx"])
    index_script.main(["--dataset", f"folder:{images}-test", "--data-root", str(tmp_path), "--teacher-path",
                       str(teacher_ckpt), "--index", str(tmp_path / "idx"), "--backend", "hnsw", "--hnsw-m", "8"])
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["backends"]["hnsw"]["params"] == {"m": 8, "ef_construction": 200}
    query = str(images / "class02" / "img0.png")
    common = ["--index", str(tmp_path / "idx"), "-k", "3", "-o", str(tmp_path / "h.json"), query]
    exact = search_script.main(["--student", str(student_ckpt), *common])
    onnx = search_script.main(["--student", str(tmp_path / "student.onnx"), *common])
    approx = search_script.main(["--student", str(tmp_path / "student.onnx"), "--backend", "hnsw", "--ef-search", "50",
                                 *common])
    assert onnx["pairing"] == "asymmetric" and onnx["student_kind"] == "onnx"
    assert approx["backend_params"] == {"m": 8, "ef_construction": 200, "ef_search": 50}
    ids = [[h["id"] for h in r["hits"]] for r in exact["results"]]
    assert ids == [[h["id"] for h in r["hits"]] for r in onnx["results"]] == [[h["id"] for h in r["hits"]] for r in approx["results"]]


def test_search_embeddings_skips_faiss_padding():
    class Padded:
        def search(self, queries, k):
            return np.array([[0.9, -3.4e38]], dtype=np.float32), np.array([[1, -1]])

    index = type("I", (), {"ids": ["a", "b"], "paths": ["/a", "/b"]})()
    assert search_embeddings(Padded(), torch.zeros(1, 2), index, 2) == [[{"rank": 1, "id": "b", "path": "/b", "score": pytest.approx(0.9)}]]


def test_image_sources(tmp_path, images):
    with pytest.raises(ValueError, match="one way"):
        collect_images([str(images)], file_list="x.txt")
    with pytest.raises(FileNotFoundError, match="nope"):
        collect_images([str(tmp_path / "nope")])
    listing = tmp_path / "list.txt"
    listing.write_text(f"# gallery\n{images / 'class00' / 'img0.png'}\n\n{images / 'class01' / 'img1.png'}\n")
    assert len(collect_images(file_list=str(listing))) == 2
    listing.write_text("missing.png\n")
    with pytest.raises(FileNotFoundError, match="line 1"):
        collect_images(file_list=str(listing))
    two = from_paths([str(images / "class00"), str(images / "class01")])
    assert two.ids[0] == "class00/img0.png" and len(set(two.ids)) == len(two)


def test_training_records_the_teacher_and_logs_retrieval_grids(tmp_path, tiny_dataset):
    """main.py: the student's checkpoints record the teacher's fingerprint, validation logs the grid to
    TensorBoard, the final table carries the query cost."""
    import main as main_module
    from lib.models.loading import load_network

    run = tmp_path / "run"
    main_module.main(["--training-dataset", f"folder:{tiny_dataset}", "--test-datasets", f"folder:{tiny_dataset}-test",
                      "--directory", str(run), "--student", "timm:resnet18", "--not-pretrained", "--whitening", "8",
                      "--image-size", "32", "--teacher-image-size", "48", "--epochs", "1", "--query-size", "8",
                      "--batch-size", "4", "--pos-num", "2", "--workers", "0", "--teacher-epochs", "1",
                      "--teacher-batch-size", "4", "--samples-per-class", "2", "--lr", "1e-3", "--teacher-lr", "1e-3",
                      "--mode", "ts_reg", "--val"])
    teacher = network_fingerprint(load_network(str(run / "teacher" / "model_best.pth")))
    for name in ("model_best.pth", "checkpoint_last.pth"):
        assert load_checkpoint(run / name)["teacher_fingerprint"] == teacher
    assert "teacher_fingerprint" not in load_checkpoint(run / "teacher" / "model_best.pth")  # trained without one
    rows = next(iter(json.loads((run / "results.json").read_text())["test"].values()))
    assert rows["student asym (S@32 -> T@48)"]["q-GFLOPs"] < rows["teacher sym (48px)"]["q-GFLOPs"]
    assert rows["naive asym (T@32 -> T@48)"]["q-GFLOPs"] < rows["teacher sym (48px)"]["q-GFLOPs"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = [t for t in events.Tags()["images"] if t.startswith("val/retrieval")]
    assert tags and [e.step for e in events.Images(tags[0])] == [0, 1]
    assert events.Images(tags[0])[0].width == GridLayoutWidth()


def GridLayoutWidth():
    from lib.evaluation.visualize import GridLayout

    return GridLayout(rows=6, k=5, blocks=2).size[0]


def test_without_faiss_or_onnx(monkeypatch, tmp_path):
    """The core imports and searches exactly without the optional packages; asking for them says what to install."""
    import sys

    for name in ("faiss", "onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)
    db = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    backend = make_backend("exact", db)
    assert backend.name == "torch"
    assert np.array_equal(backend.search(db[:3], 1)[1][:, 0], [0, 1, 2])
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        make_backend("hnsw", db)
    with pytest.raises(ImportError, match="pip install onnx"):
        export_onnx(tiny_net(), tmp_path / "s.onnx", 32)
