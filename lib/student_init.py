"""Where training starts: a student initialised in the teacher's space, a teacher's whitening from data.

The paper's student starts from ImageNet weights with a randomly initialised whitening, so its first
embeddings live in a random 128-d space, unrelated to the teacher's; the absolute term then has to
rotate the whole space into place while the relative terms already shape it. On many classes with a
few images each this fails in the way the alignment figures name (``lib.evaluation.alignment``): the
student's symmetric mAP comes close to the teacher's while its asymmetric mAP stays far below. Starting
in the teacher's space removes that burden:

* ``teacher``: the student copies the teacher's weights (same architecture, pooling and whitening) and,
  where it sees smaller images than the teacher, its whitening is refitted as in ``regress``: the
  teacher's own whitening, fed low-resolution descriptors, lands far from the teacher's embeddings
  (cos 0.29 on cjk-glyphs-mini at 32 vs 64 px), the refitted one close to them;
* ``regress``: the student's whitening is the affine map that best sends its pooled descriptors of the
  training images (at its size) onto the teacher's embeddings of the same images (at the teacher's
  size), by ridge least squares (:func:`lib.models.net.regression_whitening`);
* ``pca``: without a teacher (``sym``), the whitening starts as the PCA whitening of the training
  images' pooled descriptors (Jegou & Chum, ECCV 2012; cirtorch's learned whitening), so the embedding
  keeps the ImageNet geometry instead of a random projection of it;
* ``auto``: ``teacher`` where the architectures match, else ``regress`` (ts modes), ``pca`` (``sym``);
* ``none``: the paper's start.

With ``--student-path`` the student starts from that checkpoint: ``auto`` and ``none`` keep it as it
is, ``regress`` and ``pca`` refit its whitening on top (e.g. a network trained at the student's size in
``sym`` mode, whose whitening is then fitted onto the teacher), ``teacher`` is refused (it would
replace the checkpoint's weights).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lib.extract import cached_extract, extract
from lib.models.net import RetrievalNet, init_whitening_from_data, regression_whitening, set_whitening

STUDENT_INITS = ("auto", "teacher", "regress", "pca", "none")
_SAME = ("architecture", "pooling", "whitening")


def same_architecture(student: RetrievalNet, teacher: Optional[RetrievalNet]) -> bool:
    return teacher is not None and all(student.meta.get(k) == teacher.meta.get(k) for k in _SAME)


def resolve_student_init(choice: str, student: RetrievalNet, teacher: Optional[RetrievalNet], *,
                         from_checkpoint: bool = False) -> str:
    """The concrete initialisation for ``choice`` (see the module docstring); errors name the option.
    ``from_checkpoint``: the student's weights come from ``--student-path``."""
    if choice not in STUDENT_INITS:
        raise ValueError(f"--student-init {choice!r} is not one of {list(STUDENT_INITS)}")
    if from_checkpoint and choice == "teacher":
        raise ValueError("--student-init teacher would replace the weights of --student-path; use --student-init "
                         "regress to refit the checkpoint's whitening onto the teacher, or auto/none to keep it "
                         "as it is")
    if from_checkpoint and choice == "auto":
        return "none"
    if choice == "auto":
        if same_architecture(student, teacher):
            return "teacher"
        if student.whiten is None:
            return "none"
        return "regress" if teacher is not None else "pca"
    if choice == "teacher" and not same_architecture(student, teacher):
        raise ValueError("--student-init teacher needs a teacher of the student's architecture, pooling and whitening; "
                         f"student {[student.meta.get(k) for k in _SAME]}, teacher "
                         f"{[teacher.meta.get(k) for k in _SAME] if teacher is not None else None}")
    if choice in ("regress", "pca") and student.whiten is None:
        raise ValueError(f"--student-init {choice} sets the whitening, but the student has none (--whitening 0)")
    if choice == "regress" and teacher is None:
        raise ValueError("--student-init regress needs a teacher (ts modes)")
    return choice


@torch.no_grad()
def initialise_student(choice: str, student: RetrievalNet, teacher: Optional[RetrievalNet], paths: Sequence[str],
                       labels: Sequence[int], *,
                       image_size: int, teacher_image_size: int, device, teacher_device, workers: int = 0,
                       cache=None, max_images: int = 20000, from_checkpoint: Optional[str] = None) -> str:
    """Apply ``choice`` to ``student`` in place; returns a line saying what was done.

    Descriptors come from the eval transform of (at most ``max_images``, evenly spaced) training images;
    the teacher's embeddings go through ``cache`` (the same entries validation and ``ts_reg`` use).
    ``from_checkpoint``: the ``--student-path`` the student's weights were loaded from.
    """
    how = resolve_student_init(choice, student, teacher, from_checkpoint=bool(from_checkpoint))
    if how == "none":
        if from_checkpoint:
            return f"the weights of {from_checkpoint} as they are (--student-path)"
        return "ImageNet backbone, random whitening (--student-init none)"
    done = f"the weights of {from_checkpoint} (--student-path)" if from_checkpoint else ""
    if how == "teacher":
        student.load_state_dict(teacher.state_dict())
        done = "the teacher's weights (same architecture)"
        if student.whiten is None or image_size == teacher_image_size:
            return done
        how = "regress"  # the same backbone sees smaller images: its pooled descriptors move, refit the map
    picked = range(0, len(paths), max(1, -(-len(paths) // max_images)))
    subset = [paths[i] for i in picked]
    dim = student.whiten.out_features
    if how == "pca" and len(subset) <= dim:
        if choice == "auto":
            return f"random whitening: {len(subset)} training images are too few for a {dim}-d PCA whitening"
        raise ValueError(f"--student-init pca needs more than {dim} training images (the whitening's dimension), "
                         f"got {len(subset)}")
    pooled = extract(student, subset, image_size, device=device, workers=workers, pooled=True,
                     progress="student descriptors for the whitening")
    if how == "pca":
        init_whitening_from_data(student, pooled)  # the one PCA-whitening path
        return f"{done + ', ' if done else ''}PCA whitening of {len(subset)} training images"
    targets = cached_extract(cache, teacher, subset, teacher_image_size, device=teacher_device, workers=workers,
                             progress="teacher embeddings for the whitening")
    if targets.shape[1] != dim:
        raise ValueError(f"the teacher embeds in {targets.shape[1]} dimensions, the student's whitening in {dim}")
    ridge, held_out = select_ridge(pooled, targets, [labels[i] for i in picked])
    set_whitening(student, *regression_whitening(pooled, targets, ridge))
    return (f"{done + ', ' if done else ''}whitening regressed onto the teacher's embeddings of "
            f"{len(subset)} training images (ridge {ridge:g}, student-teacher cosine {held_out:.3f} on held-out classes)")


RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def select_ridge(pooled, targets, labels, ridges=RIDGES, holdout: int = 5):
    """``(ridge, cosine)``: the ridge whose map, fitted on the images of 4 of every 5 classes, gives the
    highest mean cosine with the teacher on the images of the 5th. With about as many images as descriptor
    dimensions (1,280 for lite0) plain least squares interpolates the training images and generalises
    poorly; held-out *classes* pick the shrinkage, since the map is used on classes never seen (on
    cjk-glyphs-mini at 48 vs 64 px, held-out images of the training characters favour ridge 0.1, the
    validation characters 1.0)."""
    classes = torch.unique(torch.as_tensor(labels), return_inverse=True)[1]
    test = classes % holdout == 0
    fit = ~test
    if not test.any() or not fit.any():
        return ridges[len(ridges) // 2], float("nan")
    best = (ridges[0], float("-inf"))
    for ridge in ridges:
        weight, bias = regression_whitening(pooled[fit], targets[fit], ridge)
        fitted = torch.nn.functional.normalize(pooled[test] @ weight.T + bias, dim=-1)
        cos = float((fitted * targets[test]).sum(1).mean())
        if cos > best[1]:
            best = (ridge, cos)
    return best


__all__ = ["STUDENT_INITS", "initialise_student", "select_ridge", "resolve_student_init", "same_architecture"]
