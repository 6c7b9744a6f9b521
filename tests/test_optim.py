"""RowwiseAdam: training FVs together equals training each relation alone (the authors' recipe)."""

from __future__ import annotations

import torch

from mfv.training.optim import RowwiseAdam


def test_rows_trained_together_equal_rows_trained_alone():
    torch.manual_seed(0)
    targets = torch.randn(3, 5)
    order = [0, 2, 2, 1, 0, 1, 1, 2]  # batch size 1: one relation per step
    together = torch.nn.Parameter(torch.zeros(3, 5))
    optimizer = RowwiseAdam([together], lr=0.1, weight_decay=0.01)
    for row in order:
        optimizer.zero_grad()
        ((together[row] - targets[row]) ** 2).sum().backward()
        optimizer.present_rows = torch.tensor([r == row for r in range(3)])
        optimizer.step()
    for row in range(3):
        alone = torch.nn.Parameter(torch.zeros(5))
        adam = torch.optim.Adam([alone], lr=0.1, weight_decay=0.01)
        for _ in range(order.count(row)):
            adam.zero_grad()
            ((alone - targets[row]) ** 2).sum().backward()
            adam.step()
        torch.testing.assert_close(together[row].detach(), alone.detach(), atol=1e-5, rtol=0)  # equal up to float rounding
    plain = torch.nn.Parameter(torch.zeros(3, 5))
    joint = torch.optim.Adam([plain], lr=0.1, weight_decay=0.01)
    for row in order:
        joint.zero_grad()
        ((plain[row] - targets[row]) ** 2).sum().backward()
        joint.step()
    assert not torch.allclose(plain, together)  # plain Adam keeps moving absent rows
