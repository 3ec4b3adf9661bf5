"""Data-parallel replicas: DDP with the replicas' gradients *summed*, not averaged (the loss is
already weighted by the trained tokens of the whole global batch)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from chipspan import devices
from chipspan.errors import ChipspanError


def data_parallel(module: nn.Module, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    """``module`` under DDP over ``group``, its gradients summed (not averaged) over the replicas."""
    # DDP's start-up check of the replicas' shapes makes an int64 tensor on the chip: where the chip
    # cannot hold one, the same start-up runs through the host instead.
    on_chip = torch.int64 not in devices.refused_dtypes(device.type)
    wrapped = DistributedDataParallel(
        module,
        device_ids=[device] if device.type != "cpu" else None,
        process_group=group,
        broadcast_buffers=False,
        init_sync=on_chip,
    )
    if not on_chip:
        _start_alike_through_host(module, group)
    wrapped.register_comm_hook(group, _sum_gradients)
    return wrapped


def _start_alike_through_host(module: nn.Module, group: dist.ProcessGroup) -> None:
    """DDP's start-up, shapes compared on the host: every replica's trained parameters have the
    same shapes, then take the values of the group's first replica."""
    trained = [p for p in module.parameters() if p.requires_grad]
    shapes = [tuple(p.shape) for p in trained]
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, shapes, group=group)
    if any(theirs != shapes for theirs in every):
        raise ChipspanError("data-parallel replicas hold trained parameters of different shapes; start them alike")
    first = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for parameter in trained:
            dist.broadcast(parameter, src=first, group=group)


def _sum_gradients(group, bucket):  # no annotations: DDP checks them, and here they would be strings
    """All-reduce (sum) one DDP gradient bucket over ``group``; a future of the summed flat tensor."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda done: done.value()[0])
