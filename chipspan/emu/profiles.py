"""Named chips the emulated ones can stand in for: the dtypes the real chip's plugin refuses to
hold, and its memory. ``chipspan.emu.enable(profile=...)`` (or ``$CHIPSPAN_EMU_PROFILE``) takes one
on, so code meant for that chip meets its refusals in a test, on any machine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chipspan.devices import REFUSED_DTYPES
from chipspan.errors import ChipspanError

GIB = 1 << 30


@dataclass(frozen=True)
class Profile:
    name: str
    refused_dtypes: tuple[torch.dtype, ...]  # making a tensor of one of these on a chip raises TypeError
    memory_bytes: int | None  # each chip's memory where no limit is given (None: no limit)


PLAIN = Profile("plain", (), None)  # any dtype, no limit: a CPU in a chip's clothes
PROFILES = {
    profile.name: profile
    for profile in (
        PLAIN,
        Profile("bm1684x", REFUSED_DTYPES["tpu"], 14 * GIB),  # Sophgo's BM1684X (SC7 cards) under torch-tpu
    )
}


def profile_named(name: str) -> Profile:
    if name not in PROFILES:
        raise ChipspanError(f"no emulated chip profile {name!r}: choose one of {', '.join(PROFILES)}")
    return PROFILES[name]
