"""chipspan's AdamW: torch.optim.AdamW's update (decoupled weight decay) in plain PyTorch on any
device, with two savers: moments kept in 8 bits (``state_bits=8``, block-wise quantized with the
dynamic code as bitsandbytes' AdamW8bit keeps them) and stochastic rounding of bf16/fp16 weights
(``stochastic_rounding=True``), so that updates far below a bf16 ulp still move them on average.

A parameter steps ``CHUNK`` elements at a time, in fp32: its moments (dequantized when 8-bit), its
value and its gradient as fp32 exist for one chunk only, then the chunk's value is written back in
the parameter's dtype and its moments requantized.

``optimizer.state[p]`` holds tensors only, so the checkpoint code saves it by parameter name and
loads it under any placement:
  step             0-dim float32 on the CPU, as torch's AdamW keeps it
  exp_avg          the parameter's shape and dtype (as torch's AdamW keeps it), or (8-bit) uint8 codes (numel,) of the signed
                   dynamic code with exp_avg_absmax, fp32 (ceil(numel / BLOCK),)
  exp_avg_sq       the same, with the unsigned dynamic code and exp_avg_sq_absmax
  rounding_seed    0-dim int64 on the CPU (stochastic rounding only): with the step, it seeds the
                   rounding noise of each chunk, drawn on the parameter's chip (see rounding_noise)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable

import torch

from chipspan.optim import closure_loss
from chipspan.quant.dynamic8 import dequantize_blockwise, dynamic_map, quantize_blockwise

CHUNK = 1 << 20  # elements of a parameter stepped at once: bounds the step's fp32 scratch (whole blocks)
BLOCK = 256  # elements per absmax of 8-bit moments
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 moments with state_bits=8, as bitsandbytes does
MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # each moment's state key, and whether its code is signed
ROUNDED_DTYPES = (torch.bfloat16, torch.float16)  # what stochastic rounding applies to

_LOW64 = (1 << 64) - 1


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update for ``params`` (tensors, (name, tensor) pairs or groups, as torch
    takes them; each group's "lr" is what the LR scheduler changes).

    ``state_bits=32``: moments in the parameter's dtype, as torch.optim.AdamW keeps them (the update
    is computed in fp32 chunk by chunk, also for bf16/fp16 parameters). ``state_bits=8``: the moments of tensors of at least
    ``MIN_8BIT_SIZE`` elements in about 1 byte per element each (see ``state_bytes_of``).
    ``stochastic_rounding=True``: a bf16/fp16 parameter's new value is rounded up or down at random
    with the probability that makes it exact on average; ``seed`` and each parameter's name (or, for
    unnamed parameters, its order here) seed the noise, kept in the state so that a resumed run
    continues bit for bit. Parameter names only seed the noise: the groups keep none, so that saved
    groups fit any placement.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_bits: int = 32,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ):
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, not {state_bits}")
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        self.state_bits = state_bits
        self.stochastic_rounding = stochastic_rounding
        self._seed = seed
        self._rounding_seeds: dict[torch.Tensor, int] = {}
        self._codes: dict[tuple[torch.device, bool], torch.Tensor] = {}
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        """torch's, with the names of (name, tensor) pairs only seeding the rounding noise."""
        params = param_group["params"]
        params = [params] if torch.is_tensor(params) else list(params)
        names = [item[0] if isinstance(item, tuple) else None for item in params]
        super().add_param_group(
            {**param_group, "params": [item[1] if isinstance(item, tuple) else item for item in params]}
        )
        for name, p in zip(names, self.param_groups[-1]["params"]):
            label = zlib.crc32(name.encode()) if name is not None else len(self._rounding_seeds)
            self._rounding_seeds.setdefault(p, _mix64(_mix64(self._seed) ^ label) >> 1)  # an int64

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, except that the state's tensors keep their saved dtype (torch casts every one of
        them to a floating parameter's dtype: 8-bit codes, seeds, fp32 moments of bf16 weights)."""
        super().load_state_dict(state_dict)
        saved = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(saved, params):
            for key, value in state_dict["state"].get(index, {}).items():
                if torch.is_tensor(value):  # with a dimension to p's chip; 0-dim ones stay on the CPU
                    self.state[p][key] = value.to(p.device if value.dim() else "cpu", copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_parameter(p, group)
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor, group: dict) -> None:
        """One AdamW step of ``p`` (of ``group``) with its ``.grad``, chunk by chunk: what ``step``
        does for each parameter, and what stepping inside backward does for one whose gradient is
        complete (``chipspan.optim.in_backward``)."""
        if p.grad.is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")
        state = self.state[p]
        if "step" not in state:
            state.update(self._fresh_state(p))
        seed = self._rounding_seed(p, state)
        state["step"] += 1
        flat = p.detach().reshape(-1)  # a view, unless p is not contiguous
        grad = p.grad.reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            self._step_chunk(flat, grad, state, group, seed, start, min(start + CHUNK, flat.numel()))
        if flat.data_ptr() != p.data_ptr():
            p.detach().copy_(flat.view_as(p))

    def _step_chunk(
        self, flat: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, seed: int | None, start: int, end: int
    ) -> None:
        """Elements start..end of the flattened parameter ``flat`` and of its moments: their fp32
        scratch lives until this returns."""
        step = int(state["step"])
        exp_avg, exp_avg_sq = self._moments(state, start, end)
        value = flat[start:end].float()  # the chunk itself when the parameter is fp32
        adamw_update(value, grad[start:end].float(), exp_avg, exp_avg_sq, group, step)
        if value.data_ptr() != flat[start:end].data_ptr():
            flat[start:end] = rounded(value, flat.dtype, seed, step, start)
        self._store_moments(state, start, end, exp_avg, exp_avg_sq)

    def _fresh_state(self, p: torch.Tensor) -> dict:
        """Step 0 and zero moments: p's shape and dtype, or 8-bit codes and block absmax."""
        state = {"step": torch.tensor(0.0)}
        for key, _ in MOMENTS:
            if self.state_bits == 32 or p.numel() < MIN_8BIT_SIZE:
                state[key] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            else:
                state[key] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                state[f"{key}_absmax"] = torch.zeros(math.ceil(p.numel() / BLOCK), dtype=torch.float32, device=p.device)
        return state

    def _moments(self, state: dict, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (end - start,) moments of elements start..end: views of fp32 state, fp32 copies of
        16-bit state, or dequantized 8-bit state."""
        if state["exp_avg"].dtype != torch.uint8:
            return tuple(state[key].view(-1)[start:end].float() for key, _ in MOMENTS)
        blocks = slice(start // BLOCK, math.ceil(end / BLOCK))
        exp_avg, exp_avg_sq = (
            dequantize_blockwise(
                state[key][start:end],
                state[f"{key}_absmax"][blocks],
                self._code(signed, state[key].device),
                BLOCK,
                (end - start,),
                torch.float32,
            )
            for key, signed in MOMENTS
        )
        return exp_avg, exp_avg_sq

    def _store_moments(self, state: dict, start: int, end: int, *moments: torch.Tensor) -> None:
        """Store the updated moments of elements start..end: fp32 ones were updated in place, 16-bit
        ones are rounded to nearest, 8-bit ones requantized."""
        if state["exp_avg"].dtype == torch.float32:
            return
        if state["exp_avg"].dtype != torch.uint8:
            for (key, _), moment in zip(MOMENTS, moments):
                state[key].view(-1)[start:end] = moment
            return
        for (key, signed), moment in zip(MOMENTS, moments):
            codes, absmax = quantize_blockwise(moment, self._code(signed, moment.device), BLOCK)
            state[key][start:end] = codes
            state[f"{key}_absmax"][start // BLOCK : start // BLOCK + absmax.numel()] = absmax

    def _code(self, signed: bool, device: torch.device) -> torch.Tensor:
        """The dynamic code (signed for exp_avg, unsigned for exp_avg_sq) on ``device``, made once."""
        if (device, signed) not in self._codes:
            self._codes[device, signed] = dynamic_map(signed).to(device)
        return self._codes[device, signed]

    def _rounding_seed(self, p: torch.Tensor, state: dict) -> int | None:
        """The seed of p's rounding noise (kept in its state), or None when p is rounded to nearest."""
        if not (self.stochastic_rounding and p.dtype in ROUNDED_DTYPES):
            return None
        seed = state.setdefault("rounding_seed", torch.tensor(self._rounding_seeds[p], dtype=torch.int64))
        return int(seed)


def rounded(value: torch.Tensor, dtype: torch.dtype, seed: int | None, step: int, offset: int) -> torch.Tensor:
    """fp32 ``value`` (elements offset.. of a parameter) in ``dtype``: stochastically rounded with the
    noise of ``seed`` at ``step``, or to nearest when ``seed`` is None."""
    if seed is None:
        return value.to(dtype)
    return stochastic_round(value, dtype, rounding_noise(seed, step, offset, value.numel(), value.device))


def adamw_update(
    value: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, group: dict, step: int
) -> None:
    """torch.optim.AdamW's step ``step`` (from 1) on fp32 tensors of one shape, in place on
    ``value`` and the moments, with ``group``'s lr, betas, eps and weight_decay."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if weight_decay != 0:
        value.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    value.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


def stochastic_round(value: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor) -> torch.Tensor:
    """fp32 ``value`` in floating ``dtype``, rounded to the neighbour beyond the nearest value with
    probability (distance to the nearest) / (gap between the two), so that E[result] = value.
    ``noise``: uniform in [0, 1), value's shape (its 2**-24 resolution bounds the bias)."""
    nearest = value.to(dtype)
    error = value - nearest.float()  # exact: the two are within a factor of 2
    toward = torch.where(error > 0, math.inf, -math.inf).to(dtype)
    beyond = torch.nextafter(nearest, toward)
    chance = error / (beyond.float() - nearest.float())  # 0 where exact, NaN past the largest finite value
    return torch.where(noise < chance, beyond, nearest)


def rounding_noise(seed: int, step: int, offset: int, count: int, device: torch.device) -> torch.Tensor:
    """Uniform fp32 in [0, 1) (multiples of 2**-24) for elements offset..offset+count of a parameter
    at ``step``: drawn on ``device`` by a generator seeded from (seed, step, offset), so the same on
    every chip of one kind (the emulated chips draw as the CPU does) and under every placement. A run
    resumed on another kind of chip draws other noise: it stays unbiased, but not bit for bit."""
    generator = torch.Generator(device=device)
    generator.manual_seed(_mix64(_mix64(_mix64(seed) ^ step) ^ offset))
    return torch.rand(count, generator=generator, device=device)


def _mix64(x: int) -> int:
    """SplitMix64's output function: a well-spread 64-bit integer from any ``x`` >= 0."""
    x = (x + 0x9E3779B97F4A7C15) & _LOW64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _LOW64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _LOW64
    return x ^ (x >> 31)


def state_bytes_of(numel: int, state_bits: int, dtype_bytes: int = 4) -> int:
    """Bytes that the two moments of a tensor of ``numel`` elements of ``dtype_bytes`` each take on
    its chip (its step and rounding seed live on the host)."""
    if state_bits == 32 or numel < MIN_8BIT_SIZE:
        return 2 * dtype_bytes * numel
    return 2 * (numel + 4 * math.ceil(numel / BLOCK))


def step_scratch_bytes(numel: int, dtype: torch.dtype, state_bits: int, stochastic_rounding: bool) -> int:
    """At most the bytes that one step of a ``dtype`` tensor of ``numel`` elements allocates on its
    chip beyond what it holds: one chunk's fp32 scratch (per element, measured on the emulated chips:
    8, 20 with 8-bit moments; 16-bit weights 24, 24 with 8-bit moments; with stochastic rounding
    38 and 38)."""
    per_element = 8  # the denominator and its square root
    quantized = state_bits == 8 and numel >= MIN_8BIT_SIZE
    if dtype != torch.float32:
        per_element += 8  # fp32 copies of the chunk's values and gradients
    if quantized:
        per_element += 12  # the dequantized moments, and requantizing them
    elif dtype != torch.float32:
        per_element += 8  # fp32 copies of the chunk's 16-bit moments
    if stochastic_rounding and dtype in ROUNDED_DTYPES:
        per_element += 14  # the noise, the two neighbours and the chance of each
    return per_element * min(numel, CHUNK)
