"""What the methods share for running on several processes: gathers that keep the results of 1
and N processes identical."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank in rank order, keeping gradients to each rank's part.

    With it every rank computes the loss of the whole global batch, and DDP's gradient averaging
    then gives exactly the single-process gradient (see ``ClipPretrain.training_step``).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def gather_by_index(
    module: pl.LightningModule, idx: Tensor, values: dict[str, Tensor], n: int | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """Evaluation outputs of every rank, placed in dataset order.

    ``idx`` [m] are the dataset indices of this rank's rows of each ``values[k]`` [m, ...]. Returns
    ``({k: [n, ...]}, seen [n] bool on the CPU)``; ``n`` defaults to the largest index + 1. Rows no
    rank encoded (``limit_*_batches``) are 0 and not ``seen``; the duplicates DistributedSampler
    pads with carry identical values, so writing them twice is harmless.
    """
    if module.trainer.world_size > 1:
        idx = module.all_gather(idx).reshape(-1)
        values = {k: module.all_gather(v).reshape(-1, *v.shape[1:]) for k, v in values.items()}
    n = int(idx.max()) + 1 if n is None else n
    out = {}
    for key, value in values.items():
        out[key] = value.new_zeros((n, *value.shape[1:]))
        out[key][idx] = value
    seen = torch.zeros(n, dtype=torch.bool)
    seen[idx.cpu()] = True
    return out, seen
