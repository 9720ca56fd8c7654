"""Compositions: a defense is a purifier followed by a classifier, and again a classifier; K purify-and-classify
runs that vote are DensePure's base labeler."""

import torch
from torch import nn

from diffrobust import seeds


class PurifiedClassifier(nn.Module):
    """classifier(purifier(x)): a defense is again a classifier (images in [0, 1] -> logits). `randomized`: its
    forward takes the generator of the purifier's draws (attacks pass one; see attacks.gradients.logits)."""

    randomized = True

    def __init__(self, purifier, classifier):
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier

    def forward(self, x01, generator=None):
        return self.classifier(self.purifier(x01, generator))


class VotingLabeler:
    """K purify-and-classify runs on the same noisy batch, each with its own reverse RNG stream (DensePure).

    Returns labels of shape (K, B). The K reverse streams are seeded from the caller's generator, so the smoothing
    noise (drawn by the caller from another stream) is the same whatever K is, and vote k of a K-vote run equals
    vote k of a larger run.
    """

    def __init__(self, purifier, classifier, votes):
        self.purifier, self.classifier, self.votes = purifier, classifier, int(votes)

    def __call__(self, x_noisy01, generator=None):
        # One draw from the caller's stream per batch; vote k draws from the stream k of that base (diffrobust.seeds),
        # so the first K votes do not depend on how many votes are run.
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        if hasattr(self.purifier, "purify_votes"):  # the K runs together (same draws, fewer network calls)
            purified = self.purifier.purify_votes(x_noisy01, [seeds.generator(base, k) for k in range(self.votes)])
            logits = self.classifier(purified.flatten(0, 1))
            return logits.argmax(dim=1).view(self.votes, len(x_noisy01))
        labels = []
        for k in range(self.votes):
            reverse_stream = seeds.generator(base, k)
            labels.append(self.classifier(self.purifier(x_noisy01, reverse_stream)).argmax(dim=1))
        return torch.stack(labels)
