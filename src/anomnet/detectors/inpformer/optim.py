"""INP-Former's optimiser and learning-rate schedule (used only in fit).

* :class:`StableAdamW` (Wortsman et al. 2023, "Stable and low-precision training for large-scale
  vision-language models"), as INP-Former and Dinomaly train with it: AdamW (decoupled weight
  decay ``p <- p (1 - lr wd)``, optional AMSGrad) whose step on each parameter tensor is divided by
  ``max(1, RMS(g / denom) / clip)``: a tensor whose gradient jumps far above its running second
  moment takes a smaller step instead of a huge one.
* :func:`warm_cosine`: linear warm-up from 0, then cosine decay from ``lr`` to ``lr * final``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class StableAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        clip_threshold: float = 1.0,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "clip_threshold": clip_threshold,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                correction1 = 1.0 - beta1 ** state["step"]
                correction2 = 1.0 - beta2 ** state["step"]
                denom = (second.sqrt() / math.sqrt(correction2)).add_(group["eps"])
                rms = float((grad / denom).square().mean().sqrt())
                shrink = max(1.0, rms / group["clip_threshold"])
                p.addcdiv_(exp_avg, denom, value=-group["lr"] / correction1 / shrink)
        return loss


def warm_cosine(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Learning-rate factor at ``step`` of ``total``: ``(step + 1) / warmup``, then cosine down to ``final``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final + 0.5 * (1.0 - final) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The paper's StableAdamW (AMSGrad, eps 1e-10) or plain AdamW with the same lr, betas and weight decay."""
    if name == "stableadamw":
        return StableAdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, amsgrad=True, eps=1e-10)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
