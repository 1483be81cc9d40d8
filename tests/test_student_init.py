"""Where training starts: the regressed whitening against a least-squares oracle, the teacher copy,
the PCA start, and the option's errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.models.net import build_network, regression_whitening
from lib.student_init import initialise_student, resolve_student_init


def test_regression_whitening_matches_numpy_least_squares():
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(300, 20, generator=gen, dtype=torch.float64), dim=1)
    t = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    weight, bias = regression_whitening(x, t, ridge=0.0)
    design = np.hstack([x.numpy(), np.ones((300, 1))])  # oracle: ordinary least squares with an intercept
    coef = np.linalg.lstsq(design, t.numpy(), rcond=None)[0]
    assert np.allclose(weight.numpy(), coef[:-1].T, atol=1e-9) and np.allclose(bias.numpy(), coef[-1], atol=1e-9)
    # an exact affine target is recovered; the ridge shrinks the map towards zero
    truth_w, truth_b = torch.randn(6, 20, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    w, b = regression_whitening(x, x @ truth_w.T + truth_b, ridge=0.0)
    assert torch.allclose(w, truth_w, atol=1e-8) and torch.allclose(b, truth_b, atol=1e-8)
    assert regression_whitening(x, t, ridge=10.0)[0].norm() < weight.norm()
    with pytest.raises(ValueError, match="paired rows"):
        regression_whitening(x, t[:10])


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    teacher = build_network("timm:resnet18", "gem", 16, pretrained=False)
    student = build_network("timm:resnet18", "gem", 16, pretrained=False)
    other = build_network("timm:resnet18", "mac", 16, pretrained=False)
    return teacher, student, other


def _paths(tiny_dataset):
    return sorted(str(p) for p in tiny_dataset.rglob("*.png"))


def _labels(tiny_dataset):
    return [int(p.split("/")[-2][5:]) for p in _paths(tiny_dataset)]  # class07/img3.png -> 7


def test_auto_copies_a_teacher_of_the_same_architecture(nets, tiny_dataset):
    teacher, student, other = nets
    assert resolve_student_init("auto", student, teacher) == "teacher"
    assert resolve_student_init("auto", other, teacher) == "regress"
    assert resolve_student_init("auto", other, None) == "pca"
    copy = build_network("timm:resnet18", "gem", 16, pretrained=False)
    line = initialise_student("auto", copy, teacher, _paths(tiny_dataset), _labels(tiny_dataset),
                              image_size=48, teacher_image_size=48, device="cpu", teacher_device="cpu")
    assert line == "the teacher's weights (same architecture)"
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), teacher.state_dict().values()))
    # at a smaller query size the backbone is the teacher's, the whitening refitted to the teacher's space
    line = initialise_student("auto", copy, teacher, _paths(tiny_dataset), _labels(tiny_dataset),
                              image_size=32, teacher_image_size=48, device="cpu", teacher_device="cpu")
    assert "the teacher's weights (same architecture), whitening regressed" in line
    state, reference = copy.state_dict(), teacher.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in state if not k.startswith("whiten."))
    assert not torch.equal(state["whiten.weight"], reference["whiten.weight"])


def test_regress_puts_the_student_in_the_teachers_space(nets, tiny_dataset):
    from lib.extract import extract

    teacher, _, other = nets
    paths = _paths(tiny_dataset)
    before = (extract(other, paths, 32) * extract(teacher, paths, 48)).sum(1).mean()
    line = initialise_student("regress", other, teacher, paths, _labels(tiny_dataset), image_size=32,
                              teacher_image_size=48, device="cpu", teacher_device="cpu")
    after = (extract(other, paths, 32) * extract(teacher, paths, 48)).sum(1).mean()
    assert "regressed" in line and after > 0.9 and after > before + 0.3, (float(before), float(after))


def test_pca_whitening_start_and_option_errors(nets, tiny_dataset):
    teacher, student, _ = nets
    net = build_network("timm:resnet18", "gem", 16, pretrained=False)
    line = initialise_student("pca", net, None, _paths(tiny_dataset), _labels(tiny_dataset), image_size=32,
                              teacher_image_size=32, device="cpu", teacher_device="cpu")
    assert "PCA whitening of 40 training images" in line
    with pytest.raises(ValueError, match="more than 16 training images"):
        initialise_student("pca", net, None, _paths(tiny_dataset)[:10], _labels(tiny_dataset)[:10], image_size=32,
                           teacher_image_size=32, device="cpu", teacher_device="cpu")
    bare = build_network("timm:resnet18", "gem", 0, pretrained=False)
    with pytest.raises(ValueError, match="--student-init regress sets the whitening"):
        resolve_student_init("regress", bare, teacher)
    with pytest.raises(ValueError, match="--student-init teacher needs a teacher of the student's architecture"):
        resolve_student_init("teacher", bare, teacher)
    with pytest.raises(ValueError, match="needs a teacher"):
        resolve_student_init("regress", student, None)
    with pytest.raises(ValueError, match="is not one of"):
        resolve_student_init("imagenet", student, teacher)


def test_ridge_is_chosen_on_held_out_classes():
    from lib.student_init import RIDGES, select_ridge

    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(40).repeat_interleave(3)
    x = F.normalize(torch.randn(120, 30, generator=gen, dtype=torch.float64), dim=1)
    t = F.normalize(x @ torch.randn(30, 8, generator=gen, dtype=torch.float64)
                    + 0.5 * torch.randn(120, 8, generator=gen, dtype=torch.float64), dim=1)
    ridge, cos = select_ridge(x, t, labels.tolist())
    held = labels % 5 == 0  # every fifth class held out, fitted on the others
    scores = {}
    for r in RIDGES:
        w, b = regression_whitening(x[~held], t[~held], r)
        scores[r] = float((F.normalize(x[held] @ w.T + b, dim=1) * t[held]).sum(1).mean())
    assert ridge == max(scores, key=scores.get) and cos == pytest.approx(scores[ridge])


def test_pca_start_is_the_pca_whitening_of_the_pooled_descriptors(tiny_dataset, monkeypatch):
    """--student-init pca goes through lib.models.init_whitening_from_data, the one PCA-whitening path,
    and sets exactly the PCA whitening of the training images' pooled descriptors."""
    import lib.student_init as student_init
    from lib.extract import extract
    from lib.models.net import pca_whitening

    calls = []
    original = student_init.init_whitening_from_data
    monkeypatch.setattr(student_init, "init_whitening_from_data", lambda net, pooled: (calls.append(1), original(net, pooled)))
    torch.manual_seed(0)
    net = build_network("timm:resnet18", "gem", 16, pretrained=False)
    paths = _paths(tiny_dataset)
    initialise_student("pca", net, None, paths, _labels(tiny_dataset), image_size=32, teacher_image_size=32,
                       device="cpu", teacher_device="cpu")
    weight, bias = pca_whitening(extract(net, paths, 32, pooled=True), 16)
    assert calls == [1]
    assert torch.allclose(net.whiten.weight, weight, atol=1e-5) and torch.allclose(net.whiten.bias, bias, atol=1e-5)


def test_a_student_path_is_kept_unless_its_whitening_is_refitted(nets, tiny_dataset):
    """--student-path: auto/none keep the checkpoint's weights; regress refits the whitening onto the teacher
    and leaves the backbone as loaded; teacher is refused (it would discard the checkpoint)."""
    teacher, _, _ = nets
    torch.manual_seed(1)
    loaded = build_network("timm:resnet18", "gem", 16, pretrained=False)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    paths, labels = _paths(tiny_dataset), _labels(tiny_dataset)
    kw = dict(image_size=32, teacher_image_size=48, device="cpu", teacher_device="cpu", from_checkpoint="sym.pth")
    for choice in ("auto", "none"):
        line = initialise_student(choice, loaded, teacher, paths, labels, **kw)
        assert line == "the weights of sym.pth as they are (--student-path)"
        assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())
    line = initialise_student("regress", loaded, teacher, paths, labels, **kw)
    assert line.startswith("the weights of sym.pth (--student-path), whitening regressed"), line
    state = loaded.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in state if not k.startswith("whiten."))
    assert not torch.equal(state["whiten.weight"], before["whiten.weight"])
    with pytest.raises(ValueError, match="--student-init teacher would replace the weights of --student-path"):
        initialise_student("teacher", loaded, teacher, paths, labels, **kw)
