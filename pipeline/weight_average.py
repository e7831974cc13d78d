"""An exponential moving average (EMA) of a network's weights, kept beside the training.

After every optimiser step the average moves a fraction ``1 - decay`` of the way towards the
current weights; it is the network that is validated, checkpointed and shipped, while the
optimiser keeps stepping the raw weights. Averaging smooths out the last steps' noise, which
is what makes two otherwise equal trainings disagree (docs/decisions/0010-no-weight-averaging-or-ensembles.md;
docs/benchmarks.md, options tried and not adopted).

BatchNorm's running statistics are averaged like the weights (as timm's ``ModelEmaV2`` does);
integer buffers (the batch counters) are copied. Until the training has made more steps than the
average's horizon (``1 / (1 - decay)``) it is the plain mean of all the weights so far (decay
``n / (n + 1)`` at update ``n``, 0 at the first): it never drags the random initial weights along,
and a short training is not held back by a long horizon. (timm's ``(1 + n) / (10 + n)`` ramp stays
below 0.995 for 1,790 steps, longer than a 12-epoch training here, so the decay asked for would
never apply.)

Why not ``torch.optim.swa_utils.AveragedModel``: with ``use_buffers=True`` it would also average
the integer batch counters (a counter at 7 read 6 after two of its updates: tried with torch 2.13), and
the decay ramp would need its own ``avg_fn`` anyway; the arithmetic here is the same ``lerp``.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    """The EMA copy of ``model``; :meth:`update` after each optimiser step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) to average weights, got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, self.updates / (self.updates + 1))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model``'s current weights (the raw module, not a DDP or
        compiled wrapper: their state dicts name the same tensors differently)."""
        d = self.current_decay()
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            value = current[name]
            if avg.is_floating_point():
                avg.lerp_(value.to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
