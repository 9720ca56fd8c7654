"""Gradient modes of a defense under attack, and the wrappers that let any attack library see a project defense.

A defense here is an images -> logits callable ``defense(x01, generator=None)`` (a classifier, or
`defenses.PurifiedClassifier`). Gradient modes act on the purifier inside it:

- ``full``: backpropagate through the whole purification (the purifier is plain autograd; long chains use the
  purifier's own gradient checkpointing).
- ``bpda``: Backward Pass Differentiable Approximation (Athalye et al.) with the identity: the forward pass is the
  purifier's, the backward pass treats it as y = x.

EOT (expectation over transformation) averages over draws of the defense's randomness and combines with both:
`eot_gradient` (the mean of the per-draw gradients of a loss: EOT on the loss, as APGD's eot_iter does) and
`EOTLogits` (the defense's logits averaged over draws, whose gradient DiffPure's BPDA+EOT attack takes).
"""

import torch
from torch import nn

from diffrobust.defenses import PurifiedClassifier

GRADIENT_MODES = ("full", "bpda")


class IdentityBackward(torch.autograd.Function):
    """y = purified in the forward pass, dL/dx = dL/dy in the backward pass (BPDA with g(x) = x)."""

    @staticmethod
    def forward(ctx, x, purified):
        return purified.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class BPDAPurifier:
    """A purifier whose backward pass is the identity: the purification runs without building a graph (it is not
    differentiated), and the gradient at its output is passed through to its input unchanged."""

    def __init__(self, purifier):
        self.purifier = purifier

    def __getattr__(self, name):  # network_evaluations() etc. of the wrapped purifier
        return getattr(self.purifier, name)

    def __call__(self, x01, generator=None):
        with torch.no_grad():
            purified = self.purifier(x01, generator)
        return IdentityBackward.apply(x01, purified)


def with_gradient_mode(defense, mode):
    """The defense with its purifier in gradient mode `mode` ("full" leaves it as it is; a plain classifier has no
    purifier and is returned unchanged)."""
    if mode not in GRADIENT_MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of {GRADIENT_MODES}")
    if mode == "full" or not isinstance(defense, PurifiedClassifier):
        return defense
    return PurifiedClassifier(BPDAPurifier(defense.purifier), defense.classifier)


def logits(defense, x, generator=None):
    """defense(x) -> logits, passing `generator` to a randomized defense (one with ``randomized = True``, as
    `PurifiedClassifier` and `EOTLogits`); a plain classifier takes none."""
    return defense(x, generator) if getattr(defense, "randomized", False) else defense(x)


class EOTLogits(nn.Module):
    """The defense's logits averaged over `draws` independent draws of its randomness (eot_defense_ave='logits'
    in DiffPure's BPDA+EOT attack). The draws run as one batch of draws × N images."""

    randomized = True

    def __init__(self, defense, draws):
        super().__init__()
        self.defense, self.draws = defense, int(draws)

    def forward(self, x, generator=None):
        repeated = x.repeat(self.draws, *([1] * (x.dim() - 1)))
        out = logits(self.defense, repeated, generator)
        return out.reshape(self.draws, x.shape[0], *out.shape[1:]).mean(dim=0)


def eot_gradient(loss_fn, x, draws, generator=None):
    """EOT on the loss: the mean over `draws` of the gradient of ``loss_fn(x, generator)`` (summed over the batch)
    with respect to x, each draw continuing the same generator. Returns (mean loss per image, mean gradient)."""
    total_grad = torch.zeros_like(x)
    total_loss = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(int(draws)):
        x_var = x.detach().clone().requires_grad_(True)
        loss = loss_fn(x_var, generator)
        (grad,) = torch.autograd.grad(loss.sum(), x_var)
        total_grad += grad
        total_loss += loss.detach()
    return total_loss / draws, total_grad / draws


class _CountBackward(torch.autograd.Function):
    """Identity that adds the batch size to counter[0] when the gradient passes back through it."""

    @staticmethod
    def forward(ctx, x, counter):
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        ctx.counter[0] += grad_output.shape[0]
        return grad_output, None


class BoundDefense(nn.Module):
    """An attack library's view of a project defense: ``module(x) -> logits`` whose randomness comes from the
    generator bound here (never from torch's global RNG, which AutoAttack reseeds on every call), so an attack is
    reproducible given the generator's seed. A caller that draws its own randomness (eot_pgd) passes a generator
    per call instead. Counts images forwarded and images back-propagated (each EOT draw counts)."""

    randomized = True

    def __init__(self, defense, generator=None):
        super().__init__()
        self.defense, self.generator = defense, generator
        self.forward_images = 0
        self._gradient_images = [0]

    @property
    def gradient_images(self):
        return self._gradient_images[0]

    def forward(self, x, generator=None):
        self.forward_images += x.shape[0]
        if x.requires_grad and torch.is_grad_enabled():
            x = _CountBackward.apply(x, self._gradient_images)
        return logits(self.defense, x, generator if generator is not None else self.generator)
