"""Defenses as compositions of one-interface pieces.

- A *purifier* (denoiser) maps images in [0, 1] to images in [0, 1]: ``purifier(x01, generator) -> x01``.
- A *classifier* maps images in [0, 1] to logits (an ``nn.Module``).
- A *defense* is a composition: `PurifiedClassifier(purifier, classifier)` is again a classifier (images -> logits),
  so certification and attacks take any of them.
- A *labeler* (what randomized smoothing queries) maps a batch of noisy images to labels, (B,) or (K, B) when K
  reverse runs vote (`VotingLabeler`, DensePure).

Paper-specific choices (the t* rule, the reverse process, its step count, the number of votes) are constructor
arguments, named as the papers name them, and come from the config.

Modules: `smoothing` (the denoisers of DDS and DensePure, the t* rules), `compose` (`PurifiedClassifier`,
`VotingLabeler`). The names below are re-exported so that callers import them from `diffrobust.defenses`.
"""

from diffrobust.defenses.compose import PurifiedClassifier, VotingLabeler
from diffrobust.defenses.smoothing import REVERSE_PROCESSES, TSTAR_RULES, SmoothingDenoiser, tstar_time

__all__ = ["PurifiedClassifier", "REVERSE_PROCESSES", "SmoothingDenoiser", "TSTAR_RULES", "VotingLabeler",
           "tstar_time"]
