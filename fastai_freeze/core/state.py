"""Saving and giving back the state a probe may disturb: module modes, random number generators.

Each helper restores in a `finally`, so that an error, or a `KeyboardInterrupt` (which is not an
`Exception`), leaves nothing behind.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["kept_modes", "random_state", "set_random_state", "kept_random_state", "first_tensor", "device_of"]


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[dict[nn.Module, bool]]:
    "Inside, change any module's training flag; on exit every module of `model` has its flag back."
    modes = {m: m.training for m in model.modules()}
    try:
        yield modes
    finally:
        for m, t in modes.items():
            m.training = t


def random_state() -> tuple:
    "Python's, NumPy's and torch's (CPU and, once initialised, CUDA) random states."
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def set_random_state(state: tuple) -> None:
    "Give back the states `random_state()` returned."
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def kept_random_state() -> Iterator[None]:
    "Python's, NumPy's and torch's random states, given back on exit."
    state = random_state()
    try:
        yield
    finally:
        set_random_state(state)


def first_tensor(batch) -> torch.Tensor:
    "The input of a batch: the batch itself, or the first element of (nested) tuples and lists."
    while isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("an empty batch has no input tensor")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"expected a tensor (or a tuple whose first element is one), got {type(batch).__name__}")
    return batch


def device_of(model: nn.Module) -> torch.device | None:
    "The device of the model's first parameter or buffer (None for a model with neither)."
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None
