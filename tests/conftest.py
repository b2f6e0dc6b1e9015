import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

# every test run shares one cache of the pretrained source model (built once, ~10 s)
os.environ.setdefault("FASTAI_FREEZE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(min(2, os.cpu_count() or 1))

from fastai.metrics import accuracy  # noqa: E402

from fastai_freeze.demo.data import TARGET_CLASSES, make_patterns, pretrained_tiny_resnet, tensor_dls  # noqa: E402
from fastai_freeze.transfer import new_head_learner  # noqa: E402


@pytest.fixture(scope="session")
def source_model():
    return pretrained_tiny_resnet(verbose=False)


@pytest.fixture(scope="session")
def target_data():
    "Four unseen pattern classes: 96 training and 64 validation images of 32 px."
    xt, yt = make_patterns(24, TARGET_CLASSES, size=32, seed=1)
    xv, yv = make_patterns(16, TARGET_CLASSES, size=32, seed=2)
    return xt, yt, xv, yv


@pytest.fixture
def make_learner(source_model, target_data):
    def _make(bs=16, seed=0, metrics=accuracy, **kwargs):
        # copies: a test may write into its Learner's data (NaN injection), the next must not see it
        xt, yt, xv, yv = (t.clone() for t in target_data)
        dls = tensor_dls(xt, yt, xv, yv, bs=bs, seed=seed)
        torch.manual_seed(seed)
        learn = new_head_learner(source_model, dls, metrics=metrics, **kwargs)
        return learn
    return _make


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    "`load_benchmark('ladder')`: the script benchmarks/ladder.py as a module (registered in sys.modules)."
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    return load
