"""Which process does what: the 2-D mesh of pipeline stages × data-parallel replicas.

    rank = stage_rank * data_parallel + replica        (torchrun's global rank)

Ranks that hold the same pipeline position sit next to each other, so with one machine per stage
group the data-parallel gradient all-reduce stays inside a machine and only the (small) activations
cross machines. A rank of pipeline position p holds the stages p, p + P, p + 2P, … (P = pipeline
ranks): one stage for GPipe/1F1B, ``virtual`` stages for interleaved 1F1B.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from chipspan import devices
from chipspan.distributed import host_staged
from chipspan.errors import ChipspanError

# The collective library of each device type; other types use what their plugin registered, and
# where it registered none (Sophgo's BM1684X, emulated chips) host-staged gloo (host_staged.py).
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl", "xpu": "xccl"}


@dataclass(frozen=True)
class Layout:
    """Where one rank sits: ``pipeline`` × ``data`` ranks, ``virtual`` stages per rank."""

    pipeline: int
    data: int
    virtual: int
    rank: int

    @property
    def stage_rank(self) -> int:
        """Position along the pipeline, 0 … pipeline - 1."""
        return self.rank // self.data

    @property
    def replica(self) -> int:
        return self.rank % self.data

    @property
    def num_stages(self) -> int:
        return self.pipeline * self.virtual

    @property
    def stages(self) -> list[int]:
        """The pipeline stages this rank runs, in order."""
        return [self.stage_rank + k * self.pipeline for k in range(self.virtual)]

    def rank_of(self, stage: int, replica: int) -> int:
        return (stage % self.pipeline) * self.data + replica

    @property
    def writes_outputs(self) -> bool:
        """Global rank 0 writes logs, results and checkpoints."""
        return self.rank == 0


def backend_for(device_type: str) -> str:
    """gloo on CPU, nccl on CUDA, hccl on Ascend; otherwise the backend the vendor plugin registered
    (``sccl`` on Sophgo's SG2260) with gloo for host tensors, else gloo through host memory."""
    if device_type in BACKENDS:
        return BACKENDS[device_type]
    vendors = dist.Backend.default_device_backend_map.get(device_type)
    if vendors is not None and vendors != host_staged.NAME:
        return f"cpu:gloo,{device_type}:{vendors}"  # host tensors (counts, object lists) over gloo
    return host_staged.register(device_type)


def environment_world() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, processes on this machine) from torchrun's environment."""
    get = os.environ.get
    world = int(get("WORLD_SIZE", "1"))
    return int(get("RANK", "0")), world, int(get("LOCAL_RANK", "0")), int(get("LOCAL_WORLD_SIZE", str(world)))


def plan_layout(world: int, rank: int, data_parallel: int, virtual: int) -> Layout:
    """The layout of ``world`` processes, or one line saying why they do not divide."""
    if data_parallel < 1:
        raise ChipspanError(f"--data_parallel must be at least 1, not {data_parallel}")
    if world % data_parallel:
        raise ChipspanError(
            f"{world} processes cannot form pipelines × {data_parallel} data-parallel replicas: "
            f"start a multiple of {data_parallel} processes (stages × data_parallel)"
        )
    return Layout(pipeline=world // data_parallel, data=data_parallel, virtual=virtual, rank=rank)


def rank_device(device_type: str, chips: str | None, local_rank: int, local_world: int) -> torch.device:
    """This process's chip: the ``local_rank``-th of ``--chips`` (default: chips 0 … local_world - 1)."""
    chip_ids = devices.parse_chip_ids(chips) if chips else list(range(local_world))
    if chips and len(chip_ids) != local_world:
        raise ChipspanError(
            f"--chips {chips} names {len(chip_ids)} chip(s) but {local_world} processes run on "
            "this machine: one process per chip"
        )
    devices.prepare_device_type(device_type, chip_ids[-1] + 1)
    device = devices.chip_devices(device_type, [chip_ids[local_rank]])[0]
    if device.index is not None:
        torch.get_device_module(device_type).set_device(device.index)
    return device


def start(layout: Layout, device: torch.device, timeout_s: int) -> DeviceMesh:
    """Join the process group (a collective waits ``timeout_s`` seconds at most) and build the
    (pipeline, data) mesh."""
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device.type), timeout=datetime.timedelta(seconds=timeout_s))
    return init_device_mesh(device.type, (layout.pipeline, layout.data), mesh_dim_names=("pipeline", "data"))


def tied_group(layout: Layout) -> dist.ProcessGroup | None:
    """The 2-rank group of this replica's first and last stage (tied embeddings), None if one rank holds both.

    Every rank creates every replica's group, as ``new_group`` requires.
    """
    mine = None
    for replica in range(layout.data):
        ends = sorted({layout.rank_of(0, replica), layout.rank_of(layout.num_stages - 1, replica)})
        if len(ends) == 1:
            return None
        group = dist.new_group(ends)
        if layout.rank in ends:
            mine = group
    return mine
