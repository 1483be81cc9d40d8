"""Teacher-embedding cache: hits on the same key, recomputes on any change, survives corrupt files."""
import torch

from lib.cache import EmbeddingCache, network_fingerprint, paths_fingerprint
from lib.models import build_network


def test_cache_hit_and_invalidation(tmp_path):
    cache = EmbeddingCache(tmp_path)
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return torch.full((3, 2), float(value))
        return run

    net = build_network("timm:resnet18", "gem", 8, pretrained=False)
    parts = dict(network=network_fingerprint(net), paths=paths_fingerprint(["a", "b", "c"]), image_size=64,
                 transform="eval", scales=[1.0])
    first = cache.get_or_compute(parts, compute(1))
    again = cache.get_or_compute(parts, compute(2))
    assert torch.equal(first, again) and calls == [1] and cache.hits == 1
    for change in (dict(image_size=32), dict(paths=paths_fingerprint(["a", "b"])), dict(scales=[1.0, 0.5]),
                   dict(transform="other")):
        cache.get_or_compute({**parts, **change}, compute(3))
    assert calls == [1, 3, 3, 3, 3]
    with torch.no_grad():
        net.whiten.bias.add_(1e-3)  # any change of the weights changes the key
    assert network_fingerprint(net) != parts["network"]
    # a corrupt cache file is recomputed, not trusted
    for f in tmp_path.glob("*.pt"):
        f.write_bytes(b"garbage")
    assert torch.equal(cache.get_or_compute(parts, compute(4)), torch.full((3, 2), 4.0))


def test_disabled_cache_always_computes():
    cache = EmbeddingCache(None)
    assert cache.get_or_compute({}, lambda: torch.ones(1)).item() == 1 and cache.misses == 1
