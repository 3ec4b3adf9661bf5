"""Data-parallel replicas: DDP with the replicas' gradients *summed*, not averaged (the loss is
already weighted by the trained tokens of the whole global batch)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def data_parallel(module: nn.Module, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    """``module`` under DDP over ``group``, its gradients summed (not averaged) over the replicas."""
    wrapped = DistributedDataParallel(
        module, device_ids=[device] if device.type != "cpu" else None, process_group=group, broadcast_buffers=False
    )
    wrapped.register_comm_hook(group, _sum_gradients)
    return wrapped


def _sum_gradients(group, bucket):  # no annotations: DDP checks them, and here they would be strings
    """All-reduce (sum) one DDP gradient bucket over ``group``; a future of the summed flat tensor."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda done: done.value()[0])
