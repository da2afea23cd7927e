"""Process-group and device set-up under torchrun (sae_core.distributed), without a GPU."""

from __future__ import annotations

import pytest
import torch

from sae_core import UserError, distributed, models


def test_cpu_tensors_have_a_backend_where_cuda_is_present(monkeypatch):
    """NCCL alone takes only CUDA tensors; the stages also reduce CPU tensors and Python objects."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.distributed_backend() == "cpu:gloo,cuda:nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.distributed_backend() == "gloo"


def _fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("local_rank", [0, 1])
def test_more_processes_than_gpus_is_refused_on_every_rank(monkeypatch, local_rank):
    _fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    with pytest.raises(UserError, match=r"torchrun started 2 processes on this node but 1 GPU\(s\) are visible; "
                                        r"use --nproc_per_node 1"):
        distributed.rank_device("cuda", local_rank, 2)


def test_one_process_per_gpu_gets_its_gpu(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert distributed.rank_device("cuda", 1, 2) == torch.device("cuda", 1) == chosen[0]


def test_a_gpu_index_beyond_the_visible_ones_is_refused(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    assert models.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"device 'cuda:2' asked for but only 2 GPU\(s\) are visible; use cuda:0 to cuda:1"):
        models.resolve_device("cuda:2")
