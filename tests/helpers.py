"""Small helpers shared by the test modules (import with `from helpers import ...`)."""

import torch


def randomize(network, seed, scale=0.05):
    """Give every parameter seeded random values: ADM and EDM zero-initialise their output layers, and timm / HF
    initialise heads to near zero, which would hide a mistake in loading or wiring."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return network
