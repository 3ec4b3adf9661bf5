"""AdamW whose fp32 master weights and moments live in host memory (ZeRO-Offload's idea; DeepSpeed's
``offload_optimizer: {device: cpu}``), so that a chip holds only the weights it trains in their own
dtype and, for a moment, their gradients.

``step()`` hands each parameter to a background worker of its chip (one thread per chip, taking its
parameters in the order the forward uses them) and returns at once. The worker copies the gradient
to the host as fp32 (the chip's gradient is freed as soon as it is copied, once ``zero_grad`` has
dropped it), steps the master copy with torch's own AdamW math, and writes the master back to the
chip parameter in that parameter's dtype. Meanwhile the chips go on: a module's forward waits only
for the parameters it reads (forward pre-hooks, ``install_waits``), and ``synchronize()`` waits for
everything — call it before reading weights or optimizer state (checkpoints, evaluation without a
forward, the end of the run).

Per parameter, ``optimizer.state[p]`` holds tensors only — ``master``, ``exp_avg``, ``exp_avg_sq``
(fp32, p's shape, on the host; pinned when p's chip is CUDA) and ``step`` (0-dim) — so checkpoints
save it by name as they save torch's AdamW, and a state loaded onto the host continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn
from torch.optim.adamw import adamw

from chipspan.models.decoder import CausalLM
from chipspan.optim import closure_loss

HOST = torch.device("cpu")
HOST_BYTES_PER_PARAMETER = 16  # fp32 master, exp_avg, exp_avg_sq, and the fp32 gradient staging buffer
HOST_TENSORS = ("master", "exp_avg", "exp_avg_sq")  # a parameter's fp32 state of its shape; "step" besides
SETTINGS = ("lr", "betas", "eps", "weight_decay")  # a group's settings an update is made with


def host_bytes_of(num_params: int) -> int:
    """Host memory (bytes) the optimizer holds for ``num_params`` trained parameter elements."""
    return HOST_BYTES_PER_PARAMETER * num_params


def state_device(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> torch.device:
    """Where ``optimizer`` keeps ``param``'s state: the host for HostOffloadedAdamW, else param's chip."""
    return HOST if isinstance(optimizer, HostOffloadedAdamW) else param.device


class HostOffloadedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's updates (no amsgrad), with the master weights and moments on the host.

    Args as torch.optim.AdamW's; ``modules``: the modules (stages) owning the parameters, whose
    forwards are made to wait for their parameters' updates (see ``install_waits``).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        modules: Iterable[nn.Module] = (),
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._workers: dict[torch.device, ThreadPoolExecutor] = {}
        self._updates: dict[torch.Tensor, Future] = {}  # each parameter's latest update
        self._staging: dict[torch.Tensor, torch.Tensor] = {}  # each parameter's fp32 host gradient
        self._use_order: dict[torch.Tensor, int] = {}  # when the forward first reads each parameter
        self.install_waits(modules)

    def install_waits(self, modules: Iterable[nn.Module]) -> None:
        """Make every forward of a submodule of ``modules`` first wait until the parameters it reads
        are updated on their chip, and let the workers update parameters in that order."""
        trained = {p for group in self.param_groups for p in group["params"]}
        for module in modules:
            for reader, params in _readers(module):
                waited = [p for p in params if p in trained]
                if waited:
                    for p in waited:
                        self._use_order.setdefault(p, len(self._use_order))
                    reader.register_forward_pre_hook(self._waiter(waited))

    def _waiter(self, params: list[nn.Parameter]) -> Callable:
        def wait_for_updates(module, args) -> None:
            for p in params:
                update = self._updates.get(p)
                if update is not None:
                    update.result()

        return wait_for_updates

    @torch.no_grad()
    def step(self, closure=None):
        """Start the update of every parameter with a gradient; returns before they are done."""
        loss = closure_loss(closure)
        pending = [
            (p, {key: group[key] for key in SETTINGS})  # the settings now: the scheduler changes them next
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        pending.sort(key=lambda item: self._use_order.get(item[0], len(self._use_order)))
        for param, settings in pending:
            worker = self._worker(param.device)
            copied = worker.submit(self._stage_gradient, param, param.grad)
            self._updates[param] = worker.submit(self._update, param, settings, copied)
        return loss

    def synchronize(self) -> None:
        """Wait until every update started so far is on its chip (raising a worker's error, if any)."""
        for update in list(self._updates.values()):
            update.result()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; zeroing in place (``set_to_none=False``) first waits for the gradients' copies."""
        if not set_to_none:
            self.synchronize()
        super().zero_grad(set_to_none)

    def state_dict(self) -> dict:
        self.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that the state lands on the host as saved (torch's would cast every state
        tensor, the master included, to its parameter's chip and dtype)."""
        self.synchronize()
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                self.state[param] = {k: _host_copy(v) for k, v in state_dict["state"][saved_id].items()}

    # -- what a chip's worker does, in order, for each parameter --

    def _worker(self, device: torch.device) -> ThreadPoolExecutor:
        if device not in self._workers:
            self._workers[device] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"offload-{device}")
        return self._workers[device]

    def _stage_gradient(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        """Copy ``grad`` into param's fp32 host buffer (a task of its own: once it is done the worker
        holds no reference to the chip gradient)."""
        if param not in self._staging:
            self._staging[param] = _host_empty(param)
        self._staging[param].copy_(grad)

    def _update(self, param: nn.Parameter, settings: dict, copied: Future) -> None:
        """Step param's master copy on the host with its staged gradient; write it back to the chip."""
        copied.result()
        with torch.no_grad():
            state = self._host_state(param)
            staging = self._staging[param]
            _adamw(state, staging, settings)
            _copy_to_chip(param, _in_chip_dtype(state["master"], staging, param.dtype))

    def _host_state(self, param: nn.Parameter) -> dict:
        """param's state, made at its first step (the master a fp32 copy of the chip's value) and kept
        fp32 on the host (pinned for a CUDA chip) whatever a checkpoint's loading left."""
        state = self.state[param]
        if "master" not in state:
            state["master"] = _host_empty(param).copy_(param)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = _host_empty(param).zero_()
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        for key in HOST_TENSORS:
            state[key] = _fit_for_host(state[key], _pinned_for(param))
        return state


def _readers(module: nn.Module) -> Iterator[tuple[nn.Module, list[nn.Parameter]]]:
    """Each submodule of ``module`` with the parameters its forward reads, in the order a forward runs
    them: its own; and a CausalLM's final norm also the head's, which ``CausalLM.loss`` reads right
    after the norm without calling the head."""
    submodules = list(module.modules())
    for sub in submodules:
        yield sub, list(sub.parameters(recurse=False))
    for sub in submodules:
        if isinstance(sub, CausalLM) and sub.lm_head is not None:
            yield sub.model.norm, list(sub.lm_head.parameters())


def _pinned_for(param: nn.Parameter) -> bool:
    return param.device.type == "cuda"


def _host_empty(param: nn.Parameter) -> torch.Tensor:
    """An uninitialized fp32 host tensor of param's shape, pinned for a CUDA chip."""
    return torch.empty(param.shape, dtype=torch.float32, pin_memory=_pinned_for(param))


def _fit_for_host(tensor: torch.Tensor, pinned: bool) -> torch.Tensor:
    """``tensor`` itself when it is fp32 on the host (and pinned when asked), else such a copy."""
    if tensor.device == HOST and tensor.dtype == torch.float32 and (tensor.is_pinned() or not pinned):
        return tensor
    copy = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=pinned)
    return copy.copy_(tensor)


def _host_copy(value):
    """A loaded state value in host memory of its own."""
    return value.to(HOST, copy=True) if torch.is_tensor(value) else value


def _adamw(state: dict, grad: torch.Tensor, settings: dict) -> None:
    """One torch.optim.AdamW step (its own single-tensor code) of ``state``'s master and moments."""
    beta1, beta2 = settings["betas"]
    adamw(
        [state["master"]],
        [grad],
        [state["exp_avg"]],
        [state["exp_avg_sq"]],
        [],
        [state["step"]],
        foreach=False,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        eps=settings["eps"],
        maximize=False,
    )


def _in_chip_dtype(master: torch.Tensor, staging: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The master (fp32) as the chip parameter's ``dtype``: itself for fp32 (or wider), else rounded
    into the front of the gradient staging buffer, whose gradient the step has already used — no host
    memory is added, and the chip receives only its dtype's bytes (from pinned memory on CUDA)."""
    if dtype.itemsize >= master.dtype.itemsize:
        return master
    rounded = staging.view(-1).view(dtype)[: master.numel()].view(master.shape)
    return rounded.copy_(master)


def _copy_to_chip(param: nn.Parameter, source: torch.Tensor) -> None:
    param.copy_(source)
