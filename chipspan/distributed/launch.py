"""Where a `chipspan train` runs: in this process, or one process per chip under torchrun.

The path is ``chipspan.chips.job.one_process_per_chip`` (the rule `chipspan plan` shows too):

one process per chip, started by torchrun   -> chipspan.distributed (this rank's stages)
one process per chip, not yet started       -> re-run this command under torchrun (--launcher torchrun)
otherwise                                   -> chipspan.train (every chip in this process)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from chipspan import devices
from chipspan.args import RunArguments
from chipspan.chips.job import one_process_per_chip, under_torchrun
from chipspan.distributed.mesh import plan_layout
from chipspan.distributed.pipeline import VIRTUAL_STAGES, check_schedule
from chipspan.errors import ChipspanError


def wants_processes(run: RunArguments, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is one rank of a torchrun job that should train as a pipeline."""
    return one_process_per_chip(run, environ) and under_torchrun(environ)


def relaunch_command(run: RunArguments, flags: list[str]) -> list[str]:
    """``python -m torch.distributed.run --nproc-per-node N -m chipspan train FLAGS``: one process per chip
    (N from --chips or SOPHGO_SPLIT)."""
    if run.chips.chips is None:
        raise ChipspanError(
            "--launcher torchrun starts one process per chip: name the chips with --chips 0-3 (or SOPHGO_SPLIT=4)"
        )
    chips = len(devices.parse_chip_ids(run.chips.chips))
    schedule = run.chips.pipeline_schedule
    check_schedule(schedule, run.training.micro_batches, run.training.per_device_train_batch_size)
    plan_layout(chips, 0, run.chips.data_parallel, VIRTUAL_STAGES[schedule])  # refuses what does not divide
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={chips}",
        "-m",
        "chipspan",
        "train",
        *flags,
    ]


def relaunch(run: RunArguments, flags: list[str]) -> int:
    """Run the command again under torchrun; returns its exit status."""
    return subprocess.call(relaunch_command(run, flags))
