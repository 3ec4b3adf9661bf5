"""``torch_tpu.tpu.amp``: the plugin's GradScaler and autocast, with its signatures."""

import torch


class GradScaler(torch.amp.GradScaler):
    """The plugin's fp16 loss scaler: torch's rules and state format on device ``tpu``."""

    def __init__(
        self,
        init_scale=2.0**16,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=2000,
        enabled=True,
        allow_fp16=False,
    ):
        super().__init__("tpu", init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        self.allow_fp16 = allow_fp16


class autocast(torch.amp.autocast):  # noqa: N801  (the plugin's name)
    """``torch.tpu.amp.autocast(...)`` is ``torch.autocast("tpu", ...)``, fp16 by default."""

    def __init__(self, enabled=True, dtype=torch.float16, cache_enabled=True):
        super().__init__("tpu", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
