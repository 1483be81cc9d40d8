import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


def make_class_folder(root: Path, num_classes: int = 8, per_class: int = 5, size: int = 40, seed: int = 0) -> Path:
    """Synthetic images: each class a colour and a shape position, each image with noise."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 255, 3)
        cy, cx = rng.integers(8, size - 8, 2)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            y, x = np.ogrid[:size, :size]
            mask = (y - cy - rng.integers(-2, 3)) ** 2 + (x - cx - rng.integers(-2, 3)) ** 2 < 64
            img[mask] = colour
            Image.fromarray(img).save(folder / f"img{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("tiny") / "images")
