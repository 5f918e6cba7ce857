"""A training rank among the others: start the processes, sum scalars over the ranks; a free
port for their rendezvous."""
from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now, so concurrent launches on one machine
    never share a rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: torch.device


def init_processes(config) -> Ranks:
    """Threads per rank, torch.distributed through DeepSpeed, this rank's device; the world
    size must be the config's."""
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    from .deepspeed_compat import remove_shm_buffers

    # A share of the cores per rank (2 ranks on 2 cores: 1 thread each); LOCAL_SIZE is set by the launcher.
    threads = (config.parallel.threads_per_proc or int(os.environ.get("OMP_NUM_THREADS", "0"))
               or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    torch.set_num_threads(threads)
    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if "MASTER_PORT" in os.environ:  # DeepSpeed's CPU all-reduce buffer outlives the process otherwise
        atexit.register(remove_shm_buffers, os.environ["MASTER_PORT"], rank)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accelerator = get_accelerator()
    accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank))
    p = config.parallel
    if world_size != config.world_size:
        raise SystemExit(f"error: started with {world_size} ranks but the config says parallel.num_nodes="
                         f"{p.num_nodes} x parallel.num_procs={p.num_procs} = {config.world_size}")
    return Ranks(rank, world_size, device)


def all_reduce_sum(values: list[torch.Tensor], device) -> torch.Tensor:
    """Scalars summed over the ranks, in one all-reduce."""
    import deepspeed.comm as dist

    packed = torch.stack([v.to(device).reshape(()) for v in values])
    dist.all_reduce(packed)
    return packed


def sum_over_ranks(named: dict[str, torch.Tensor], device) -> dict[str, float]:
    """Named scalars summed over the ranks: one all-reduce and one read to the host."""
    return dict(zip(named, all_reduce_sum(list(named.values()), device).tolist()))
