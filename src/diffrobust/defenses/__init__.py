"""Defenses as compositions of one-interface pieces.

- A *purifier* (denoiser) maps images in [0, 1] to images in [0, 1]: ``purifier(x01, generator) -> x01``.
- A *classifier* maps images in [0, 1] to logits (an ``nn.Module``).
- A *defense* is a composition: `PurifiedClassifier(purifier, classifier)` is again a classifier (images -> logits),
  so certification and attacks take any of them.
- A *labeler* (what randomized smoothing queries) maps a batch of noisy images to labels, (B,) or (K, B) when K
  reverse runs vote (`VotingLabeler`, DensePure).

Paper-specific choices (the t* rule, the reverse process, its step count, the number of votes) are constructor
arguments, named as the papers name them, and come from the config.

RDC (Chen et al., ICML'24) is such a composition: `PurifiedClassifier(LikelihoodMaximizer(...),
DiffusionClassifier(...))`. `DiffusionClassifier` (`diffusion_classifier`) is a classifier made of a class-conditional
diffusion model: logit_y = -sum_i w(sigma_i)·mean||D(x~ + sigma_i eps_i, sigma_i, y) - x~||² over RDC's sigma grid
with its EDM weighting (or MultiHeadRDC's uniform one over the chain's timesteps), deterministic for its seed, batched
and chunked, with exact input gradients. Any class-conditional network plugs in through a denoiser adapter:
`EDMDenoiser` (EDMPrecond, one-hot labels), `ChainDenoiser` (the project's eps / v networks on a discrete chain, sigma
converted to the chain's level), `MultiheadDenoiser` and `EDMMultiheadDenoiser` (one pass gives every class);
`denoiser_for(loaded)` picks one.
`LikelihoodMaximizer` (`likelihood`) is RDC's LM purifier: a few Adam steps on the unconditional denoising loss,
unrolled and differentiable (gradient mode `full`), or with the identity backward (`bpda`, RDC's choice).

Modules: `smoothing` (the denoisers of DDS and DensePure, the t* rules), `compose` (`PurifiedClassifier`,
`VotingLabeler`), `diffpure` (DiffPure's purifier), `diffusion_classifier` and `likelihood` (RDC). The names below
are re-exported so that callers import them from `diffrobust.defenses`.
"""

from diffrobust.defenses.compose import PurifiedClassifier, VotingLabeler
from diffrobust.defenses.diffusion_classifier import (SIGMA_GRIDS, WEIGHTINGS, ChainDenoiser, DiffusionClassifier,
                                                      EDMDenoiser, EDMMultiheadDenoiser, MultiheadDenoiser,
                                                      denoiser_for)
from diffrobust.defenses.likelihood import LikelihoodMaximizer
from diffrobust.defenses.smoothing import REVERSE_PROCESSES, TSTAR_RULES, SmoothingDenoiser, tstar_time

__all__ = ["ChainDenoiser", "DiffusionClassifier", "EDMDenoiser", "EDMMultiheadDenoiser", "LikelihoodMaximizer",
           "MultiheadDenoiser", "PurifiedClassifier", "REVERSE_PROCESSES", "SIGMA_GRIDS", "SmoothingDenoiser",
           "TSTAR_RULES", "VotingLabeler", "WEIGHTINGS", "denoiser_for", "tstar_time"]
