"""Loggers: TensorBoard or nothing. Callers log; library functions return values."""
from __future__ import annotations

from typing import Any, Dict, Mapping


class NullLogger:
    def scalars(self, values: Mapping[str, float], step: int) -> None:
        pass

    def text(self, tag: str, text: str) -> None:
        pass

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        pass

    def image(self, tag: str, image: Any, step: int) -> None:
        """``image``: a PIL image or an (H, W, 3) uint8 array."""
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def image(self, tag: str, image: Any, step: int) -> None:
        import numpy as np

        self.writer.add_image(tag, np.asarray(image.convert("RGB") if hasattr(image, "convert") else image),
                              step, dataformats="HWC")

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        flat: Dict[str, Any] = {}
        for key, value in config.items():
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        self.writer.add_hparams(flat, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        self.writer.close()


def get_logger(kind: str, log_dir: str, enabled: bool = True) -> NullLogger:
    if not enabled or kind in (None, "", "none"):
        return NullLogger()
    if kind == "tensorboard":
        return TensorBoardLogger(log_dir)
    raise ValueError(f"unknown logger {kind!r}; choose tensorboard or none")


__all__ = ["NullLogger", "TensorBoardLogger", "get_logger"]
