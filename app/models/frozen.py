"""Freezing the frozen parts: no gradient, eval mode (`app.models.composites` keeps them so)."""

from __future__ import annotations

from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode (no dropout). Composites keep it that way through `.train()`."""
    module.requires_grad_(False)
    module.eval()
    return module
