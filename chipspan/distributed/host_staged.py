"""A torch.distributed backend for chips whose plugin brings no collective library: each
collective copies the chips' tensors to the host, runs there over gloo, and copies the result back.

Sophgo's BM1684X under torch-tpu has no collective library of its own (its SG2260 sibling has
``sccl``), and chipspan's emulated chips have none either; gloo takes CPU tensors only. This group
serves what chipspan's torchrun jobs use: all-reduce (DDP's gradient buckets, token counts, norms),
broadcast and all-gather (DDP's start-up checks), gather (checkpoint shards' names to rank 0),
send/recv (pipeline stages) and barrier. Every collective finishes before it returns, except send
and recv, which finish in ``wait()`` so a pipeline can post its receives before its sends.
Activations and gradients cross the host twice, which is what the plugin's own gloo fallback does too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.futures import Future

NAME = "chipspan_host"  # the backend's name in init_process_group


def register(device_type: str) -> str:
    """Make this the backend of ``device_type`` (the process's one PrivateUse1 type); the backend
    string that starts it in ``init_process_group``."""
    if NAME not in dist.Backend.backend_list:
        dist.Backend.register_backend(NAME, _create, extended_api=True, devices=[device_type])
    return f"{device_type}:{NAME}"


def _create(options, _backend_options) -> HostStagedGroup:
    group = HostStagedGroup(options.store, options.group_rank, options.group_size, options.timeout)
    group.name = options.group_id
    return group


class _Done(dist.Work):
    """A collective's handle: ``wait()`` runs ``finish`` once; ``tensors`` are its result."""

    def __init__(self, tensors: list[torch.Tensor], finish=None):
        super().__init__()
        self.tensors, self.finish = tensors, finish

    def wait(self, timeout=None) -> bool:
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()
        return True

    def get_future(self) -> Future:
        self.wait()
        future = Future()
        future.set_result(self.tensors)
        return future


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors' values in host memory (a host tensor stands for itself)."""
    return [t.cpu() for t in tensors]


def _host_buffers(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Host tensors for a collective to write into (a host tensor stands for itself)."""
    return [t if t.device.type == "cpu" else torch.empty_like(t, device="cpu") for t in tensors]


@torch.no_grad()  # as a collective writes: a pipeline's receive buffers are leaves that require grad
def _copy_back(tensors: list[torch.Tensor], host: list[torch.Tensor]) -> None:
    for tensor, staged in zip(tensors, host):
        if staged is not tensor:
            tensor.copy_(staged)


def _in_place(collective, tensors: list[torch.Tensor], opts) -> _Done:
    """``collective`` (gloo's all-reduce or broadcast) on host copies of ``tensors``, written back."""
    host = _to_host(tensors)
    collective(host, opts).wait()
    _copy_back(tensors, host)
    return _Done(tensors)


def _collected(collective, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts) -> _Done:
    """``collective`` (gloo's all-gather or gather) of host copies of ``inputs`` into ``outputs``."""
    host = [_host_buffers(per_rank) for per_rank in outputs]
    collective(host, _to_host(inputs), opts).wait()
    for per_rank, staged in zip(outputs, host):
        _copy_back(per_rank, staged)
    return _Done(outputs)


class HostStagedGroup(dist.ProcessGroup):
    """A process group over ``size`` ranks whose chip tensors are staged through host memory and gloo."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout):
        super().__init__(rank, size)
        self.gloo = dist.ProcessGroupGloo(store, rank, size, timeout)
        self.name = ""

    def getBackendName(self) -> str:  # noqa: N802  (ProcessGroup's method names)
        return NAME

    def getGroupName(self) -> str:  # noqa: N802
        return self.name

    def getGroupDesc(self) -> str:  # noqa: N802
        return self.name

    def _set_group_name(self, name: str) -> None:
        self.name = name

    def _get_backend(self, device) -> dist.ProcessGroupGloo:
        """What serves ``device``: gloo, for every device (torch 2.14 asks whether it coalesces)."""
        return self.gloo

    def allreduce(self, tensors, opts):
        return _in_place(self.gloo.allreduce, tensors, opts)

    def broadcast(self, tensors, opts):
        return _in_place(self.gloo.broadcast, tensors, opts)

    def allgather(self, outputs, inputs, opts):
        return _collected(self.gloo.allgather, outputs, inputs, opts)

    def gather(self, outputs, inputs, opts):  # outputs: one list per rank on the root, empty elsewhere
        return _collected(self.gloo.gather, outputs, inputs, opts)

    def barrier(self, opts):
        self.gloo.barrier(opts).wait()
        return _Done([])

    def send(self, tensors, dst: int, tag: int):
        return _Done(tensors, self.gloo.send(_to_host(tensors), dst, tag).wait)

    def recv(self, tensors, src: int, tag: int):
        host = _host_buffers(tensors)
        work = self.gloo.recv(host, src, tag)

        def finish():
            work.wait()
            _copy_back(tensors, host)

        return _Done(tensors, finish)

    def shutdown(self) -> None:
        self.gloo.shutdown()
