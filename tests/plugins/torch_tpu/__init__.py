"""A stand-in for Sophgo's ``torch-tpu`` plugin, for tests on any machine.

It registers chipspan's emulated chips as PyTorch's ``tpu`` device, with the ``bm1684x`` profile
(int64 and the quantized dtypes refused on a chip, 14 GiB each), behind the plugin's public
surface: ``torch_tpu.tpu`` (also ``torch.tpu``) with device, random-state and memory functions,
and ``torch_tpu.tpu.amp``'s ``GradScaler`` and ``autocast``. Like the real plugin it registers no
collective library for a BM1684X. With tests/plugins on ``PYTHONPATH``, ``USE_SOPHGO=1`` runs of
``chipspan train`` import it as they would import the plugin. ``$CHIPSPAN_EMU_CHIPS`` sets how
many chips the machine shows (default 8).
"""

import torch

from chipspan import emu

print("Arch bm1684x selected because libtpudnn.bm1684x.so works")  # the plugin's own words on import
emu.enable(profile="bm1684x", device_type="tpu")

from . import tpu  # noqa: E402  (after the device exists, as in the plugin)

torch._register_device_module("tpu", tpu)
torch.tpu = tpu
