"""Distributed training (DDP, fastai's `distrib_ctx`): decisions made once, shared by every process.

Each process may measure on its own data; rank 0's result is broadcast, so that range tests, BN
decisions and re-estimated statistics are identical everywhere. Without a process group every
function here is the identity.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["is_distributed", "broadcast_object", "broadcast_module_state", "unwrap_model", "local_fit_state"]


def is_distributed() -> bool:
    "True inside an initialised process group of more than one process."
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def broadcast_object(obj, src: int = 0):
    "Rank `src`'s `obj` on every process (picklable objects)."
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src)
    return box[0]


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    "Make every parameter and buffer of `module` equal to rank `src`'s, in place."
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        torch.distributed.broadcast(t.data, src)


def unwrap_model(model: nn.Module) -> nn.Module:
    "The module inside a `DistributedDataParallel`/`DataParallel` wrapper (else `model`)."
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


@contextmanager
def local_fit_state(learn) -> Iterator[None]:
    """Inside, the Learner fits on its own: the model unwrapped from DDP and the DataLoaders unwrapped
    from fastai's `DistributedDL` (whose index broadcast would make every rank wait for the others),
    and fastai seeing one process (`one_process_view`: no loss gathered across processes), so a probe can
    run on each process independently, for as many steps as its own curve needs. All three are put back afterwards."""
    from .internals import one_process_view, unwrap_distributed_dls
    model, dls = learn.model, list(learn.dls.loaders)
    learn.model = unwrap_model(model)
    learn.dls.loaders = unwrap_distributed_dls(learn)
    try:
        if is_distributed():  # fastai's Recorder would gather each batch's loss from every process
            with one_process_view():
                yield
        else:
            yield
    finally:
        learn.model, learn.dls.loaders = model, dls
