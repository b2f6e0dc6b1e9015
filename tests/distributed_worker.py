"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank fine-tunes the same model on the same data inside fastai's `distrib_ctx` and saves its
decisions and final weights to OUT/rank{r}.pt; the test compares the ranks.
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist
from fastai.distributed import DistributedDL
from fastai.metrics import accuracy

import fastai_freeze  # noqa: F401
from fastai_freeze import FineTuneCallback, RangeTest
from fastai_freeze.demo.data import TARGET_CLASSES, make_patterns, pretrained_tiny_resnet, tensor_dls
from fastai_freeze.transfer import new_head_learner

warnings.filterwarnings("ignore")


def _cpu_broadcast(self, t, rank):
    # fastai 2.8's DistributedDL._broadcast moves the indices to CUDA (NCCL needs it); with gloo on CPU
    # the same broadcast works on a CPU tensor. Test-only replacement, same semantics.
    t = torch.LongTensor(t)
    dist.broadcast(t, rank)
    return t.tolist()


def main(out):
    DistributedDL._broadcast = _cpu_broadcast
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    source = pretrained_tiny_resnet(verbose=False)
    xt, yt = make_patterns(40, TARGET_CLASSES, size=32, seed=1)
    xv, yv = make_patterns(10, TARGET_CLASSES, size=32, seed=2)
    result = {}
    # 1) fine_tune_with, BN re-estimated then folded (each rank's own data order: shuffled by rank)
    dls = tensor_dls(xt, yt, xv, yv, bs=8, seed=100 + rank)
    torch.manual_seed(0)
    learn = new_head_learner(source, dls, metrics=accuracy)
    with learn.distrib_ctx(sync_bn=False):
        rec = learn.fine_tune_with(1, bn="auto", range_test=RangeTest(num_it=40, max_passes=None))
    result["ftw"] = dict(policy=rec.bn.policy.value, shift=rec.bn.shift, gain=rec.bn.probe.gain,
                         lrs=[p.lrs for p in rec.phases], tests=[p.range_test.suggestion for p in rec.phases
                                                                  if p.range_test is not None])
    result["ftw_state"] = {k: v.clone() for k, v in learn.model.state_dict().items()}
    # 2) the drop-in callback inside fit_one_cycle: a range test in the middle of a DDP fit
    dls = tensor_dls(xt, yt, xv, yv, bs=8, seed=200 + rank)
    torch.manual_seed(0)
    learn = new_head_learner(source, dls, metrics=accuracy)
    cb = FineTuneCallback(freeze_epochs=1, bn="train", range_test=RangeTest(num_it=40, max_passes=None))
    with learn.distrib_ctx(sync_bn=False):
        learn.fit_one_cycle(2, 1e-3, cbs=cb)
    result["cb"] = dict(lrs=[p.lrs for p in cb.record.phases],
                        top=cb.record.phases[-1].range_test.suggestion)
    result["cb_state"] = {k: v.clone() for k, v in learn.model.state_dict().items()}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
