"""Freezing frozen parts, and a composite base class that keeps them in eval mode (unless it says otherwise)."""

from __future__ import annotations

from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode (no dropout). Composites keep it that way through `.train()`."""
    module.requires_grad_(False)
    module.eval()
    return module


class Composite(nn.Module):
    """A model made of trainable and frozen submodules.

    `trainable_names` are the submodules the optimiser updates (and DDP wraps);
    `frozen_names` get no gradient and stay in eval mode even after `.train()`, except those in
    `frozen_in_train_mode`, which follow the composite's mode (the frozen LLM's dropout is active in
    training in the reference, which freezes its parameters but never calls `eval()` on it).
    """

    trainable_names: tuple[str, ...] = ()
    frozen_names: tuple[str, ...] = ()
    frozen_in_train_mode: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> "Composite":
        super().train(mode)
        for name in self.frozen_names:
            module = getattr(self, name, None)  # optional frozen parts (e.g. no P-Former) are None
            if module is not None:
                module.train(mode and name in self.frozen_in_train_mode)
        return self

    def trainable_parameters(self):
        for name in self.trainable_names:
            for param in getattr(self, name).parameters():
                if param.requires_grad:
                    yield param
