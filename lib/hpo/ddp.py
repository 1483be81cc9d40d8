"""Under torchrun: rank 0 runs the study and broadcasts each trial's values (or the end, or an abort) to
the other ranks, which train the same trial; trials report but never prune (the ranks could not agree
on stopping mid-run)."""
from __future__ import annotations


def _broadcast(message, info, device):
    import torch
    import torch.distributed as dist

    box = [message]
    kwargs = {"device": device} if device is not None and torch.device(device).type == "cuda" else {}
    dist.broadcast_object_list(box, src=0, **kwargs)
    return box[0]


class _ReportOnly:
    """Under torchrun the ranks cannot agree on a mid-run prune: report, never prune."""

    def __init__(self, trial):
        self.trial = trial

    def report(self, value, step):
        if value is not None:
            self.trial.report(value, step)

    def should_prune(self) -> bool:
        return False
