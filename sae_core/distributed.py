"""torch.distributed set-up shared by both stages (torchrun: gloo for CPU tensors, NCCL for CUDA ones)."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from .errors import UserError, collective, several_ranks
from .models import resolve_device


def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun, "
                        "or unset WORLD_SIZE for one process") from None
    if world > 1 and not dist.is_initialized():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun "
                            "(it sets them all), or unset WORLD_SIZE for one process")
        # Both backends where CUDA is present: the stages reduce small CPU tensors (token counts,
        # metrics) and exchange Python objects beside their CUDA gradients; NCCL alone takes only
        # CUDA tensors. Object collectives and barriers then go over gloo.
        dist.init_process_group(distributed_backend())
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def distributed_backend() -> str:
    """The process-group backend: gloo for CPU tensors, plus NCCL for CUDA tensors when CUDA is present."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def over_ranks(n: int, op: str = "sum") -> int:
    """`n` reduced (`sum`, `min`, `max`) over the ranks of the process group (`n` itself without one)."""
    if not dist.is_initialized():
        return n
    t = torch.tensor([n])
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
    return int(t)


def rank_device(device: str | None, rank: int, world: int) -> torch.device:
    """The device of this rank: with several CUDA ranks, the GPU of its LOCAL_RANK."""
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        # Checked alike on every rank of the node, so that all stop rather than some waiting for the rest.
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count()
        if per_node > gpus:
            raise UserError(f"torchrun started {per_node} processes on this node but {gpus} GPU(s) are visible; "
                            f"use --nproc_per_node {gpus} (one process per GPU)")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    return dev


def any_error(error: str | None, world: int) -> str | None:
    """The first rank's error message (in rank order) on every rank, when each rank checked its own part."""
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    return error


@contextlib.contextmanager
def alike_on_every_rank():
    """Checks whose outcome is the same on every rank (functions of the settings and of files all
    ranks of a node see): a refusal in them is `collective` under torchrun (said once per node)."""
    try:
        yield
    except UserError as e:
        if several_ranks():
            collective(e)
        raise


def rank0_error(error: str | None, world: int) -> str | None:
    """Rank 0's error message on every rank, so all stop together instead of one waiting at a barrier."""
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    return error
