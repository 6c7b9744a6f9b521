"""Adam over one FV per relation, each relation as if trained on its own.

The authors fine-tune each relation's FV separately (its own Adam, its own steps). Keeping
all FVs in one ``(relations, hidden)`` parameter with plain Adam would still move a relation
on steps without any of its prompts (its moments decay and keep pushing). :class:`RowwiseAdam`
updates, and advances the step count and moments of, only the rows marked present in the
batch, so training the rows together equals training them one by one.
"""

from __future__ import annotations

import torch


class RowwiseAdam(torch.optim.Optimizer):
    """Adam on the rows of one 2-D parameter; set :attr:`present_rows` before each step.

    Args:
        params: Exactly one parameter of shape ``(rows, dim)``.
        lr, betas, eps, weight_decay: as :class:`torch.optim.Adam` (L2 weight decay).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        parameters = [p for group in self.param_groups for p in group["params"]]
        if len(parameters) != 1 or parameters[0].dim() != 2:
            raise ValueError("RowwiseAdam takes exactly one (rows, dim) parameter")
        self.present_rows: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        param = group["params"][0]
        if param.grad is None:
            return loss
        rows = self.present_rows if self.present_rows is not None else torch.ones(param.shape[0], dtype=torch.bool)
        rows = rows.to(param.device)
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros(param.shape[0], device=param.device)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        grad = param.grad[rows]
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * param[rows]
        state["step"][rows] += 1
        step = state["step"][rows][:, None]
        m = state["exp_avg"][rows].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
        denominator = (v / (1 - beta2**step)).sqrt().add_(group["eps"])
        param[rows] -= group["lr"] * (m / (1 - beta1**step)) / denominator
        return loss
