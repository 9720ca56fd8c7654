"""The diffusion classifier (DC) of RDC (Chen et al., ICML'24): a class-conditional diffusion model as a classifier.

    logit_y(x) = -sum_i w(sigma_i) · mean_CHW ||D(x~ + sigma_i eps_i, sigma_i, y) - x~||²,   x~ = 2x - 1,

as RDC's `EDMEulerIntegralDC` (`defenses/PurificationDefenses/DiffPure/DiffusionClassifier/EDMDC.py`) computes it,
with the multi-head variant of `models/unets/score_sde/MultiHeadRDC/DiffusionClassifier.py` as a weighting of the same
sum. Images are in [0, 1]; everything inside works in EDM's space x = x~ + sigma·eps (x~ in [-1, 1], `imagespace`).

Denoisers
---------
A *denoiser* adapts one class-conditional network to the interface the classifier (and likelihood maximization,
`defenses.likelihood`) uses. ``x_noisy`` = x~ + sigma·eps in EDM's space, ``sigma`` a float64 tensor [N] (kept in
float64 so that a sigma of a chain's table maps back to exactly that level):

- ``eps_all_classes(x_noisy, sigma) -> [N, K, C, H, W]``: the noise estimate eps^_y of every class y, so that
  D_y = x_noisy - sigma·eps^_y; ``denoise_all_classes`` gives D itself.
- ``eps(x_noisy, sigma)`` / ``denoise(x_noisy, sigma) -> [N, C, H, W]``: the unconditional prediction (LM), where the
  network has one.
- ``num_classes`` (K), ``evaluations_per_input`` (network evaluations of one input's K predictions: K for a
  single-head network, 1 for a multi-head one) and, for networks on a VP chain, ``chain_sigmas`` (float64 [T], the
  sigma of table index j = 0..T-1: sqrt(1/alpha_bar_j - 1)).

Four adapters: `EDMDenoiser` (an EDMPrecond / VPPrecond network, D directly, one-hot labels), `ChainDenoiser` (a
class-conditional eps or v network of the project on a discrete chain, e.g. the mini ADM model),
`MultiheadDenoiser` (a multi-head network on a chain: one pass gives every class) and `EDMMultiheadDenoiser` (a
multi-head EDM network, `networks.edm.MultiheadEDMPrecond`: one pass of D per sigma gives every class).
`denoiser_for(loaded)` picks one for a `models.LoadedModel` from its kind and family.

On a chain, EDM's x = x~ + sigma·eps is the chain state x_t = x/sqrt(1 + sigma²) at alpha_bar = 1/(1 + sigma²)
(sqrt(alpha_bar)·x~ + sqrt(1 - alpha_bar)·eps), and D = x - sigma·eps^(x_t, t). The network timestep t of a sigma
between two levels of the chain is interpolated linearly in log sigma between the two levels' network timesteps
(exact at the levels; clamped to the first / last level outside the chain), and a v network's output is converted
with the exact alpha_bar = 1/(1 + sigma²), eps = sqrt(a)·v + sqrt(1 - a)·x_t.

Weightings and grids
--------------------
The classifier computes sum_i c_i · mean_CHW (eps^_y,i - eps_i)², which is the formula above exactly (D - x~ =
sigma·(eps - eps^), so c_i = w_i·sigma_i²; nothing O(1) is subtracted to get an O(sigma) difference). Grids:

- ``"edm"``: RDC's sigma grid, ``torch.linspace(sigma_min, sigma_max, sigma_steps)`` without its last point (a left
  Riemann sum, dt = its spacing); default 1e-4, 3, 1001 (the demos `DCTK.py`, `RDCN+TK.py` use 126).
- ``"vp"``: the levels of the network's own chain (table indices `timesteps`, default all), as MultiHeadRDC.

`WEIGHTINGS`: ``edm_code`` (default on "edm"): w = (sigma² + sigma_data²)/(sigma·sigma_data)² · p(sigma) · dt with
the log-normal density **as RDC's code computes it**,
p = exp(-(ln sigma - P_mean)²/2 · P_std²)/(sigma·P_std·sqrt(2 pi)) (it multiplies by P_std² where the textbook
divides; P_mean -1.2, P_std 1.2, sigma_data 0.5), which produced the paper's numbers; ``edm_textbook``: the same with
the textbook density exp(-(ln sigma - P_mean)²/(2 P_std²)), the ratio of the two being
exp(-(ln sigma - P_mean)²/2 · (P_std² - P_std⁻²)); ``uniform`` (default on "vp"): -mean_i mean_CHW
||eps^_y,i - eps_i||², MultiHeadRDC's logits (w = 1/(n·sigma²)).

Noise, determinism, cost
------------------------
The noise eps_i of sigma point i is the same for every class and every image of a call, drawn from a CPU generator
seeded with `seed` at every call (RDC re-seeds per call): the classifier is deterministic, and a batch gives the
logits of its images classified one at a time. Network evaluations are batched over (image, sigma point) rows and
classes in chunks of about `chunk_size` evaluations. Input gradients are plain autograd (the exact DC gradient);
under a gradient, each chunk runs under `torch.utils.checkpoint`, so memory stays that of one chunk (its forward is
recomputed in the backward pass). `network_evaluations()`: n·K single-head and n multi-head per image and call
(n sigma points); a gradient query adds n·K (n) recomputed forwards and as many backward passes.
"""

import math

import torch
import torch.utils.checkpoint
from torch import nn

from diffrobust import imagespace, models, seeds

SIGMA_GRIDS = ("edm", "vp")
DEFAULT_WEIGHTING = {"edm": "edm_code", "vp": "uniform"}


# ---------------------------------------------------------------------------------------------------------------
# Grids and weightings
# ---------------------------------------------------------------------------------------------------------------

def edm_sigma_grid(sigma_min=1e-4, sigma_max=3.0, sigma_steps=1001):
    """RDC's grid: (sigma [sigma_steps - 1], dt [sigma_steps - 1]), float64; linspace without its last point."""
    if sigma_steps < 2 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"the sigma grid needs 0 < sigma_min < sigma_max and sigma_steps >= 2, got "
                         f"{sigma_min}, {sigma_max}, {sigma_steps}")
    points = torch.linspace(sigma_min, sigma_max, int(sigma_steps), dtype=torch.float64)
    return points[:-1], points[1:] - points[:-1]


def _log_normal_prefactor(sigma, P_std):
    return 1.0 / (sigma * P_std * math.sqrt(2 * math.pi))


def edm_code_density(sigma, P_mean=-1.2, P_std=1.2):
    """The log-normal density as RDC's code writes it:
    exp(-(ln sigma - P_mean)²/2 · P_std²)/(sigma P_std sqrt(2 pi))."""
    return _log_normal_prefactor(sigma, P_std) * torch.exp(-((sigma.log() - P_mean) ** 2) / 2 * P_std ** 2)


def edm_textbook_density(sigma, P_mean=-1.2, P_std=1.2):
    """The log-normal density of ln sigma ~ N(P_mean, P_std²) (EDM's training distribution)."""
    return _log_normal_prefactor(sigma, P_std) * torch.exp(-((sigma.log() - P_mean) ** 2) / (2 * P_std ** 2))


def _edm_eps_coefficients(density):
    def coefficients(sigma, dt, P_mean, P_std, sigma_data):
        # c = w·sigma² with w = (sigma² + sd²)/(sigma·sd)² · p · dt
        return (sigma ** 2 + sigma_data ** 2) / sigma_data ** 2 * density(sigma, P_mean, P_std) * dt
    return coefficients


def _uniform_eps_coefficients(sigma, dt, P_mean, P_std, sigma_data):
    return torch.full_like(sigma, 1.0 / sigma.numel())


# weighting -> (sigma, dt, P_mean, P_std, sigma_data) -> eps-space coefficients c_i = w_i·sigma_i²
WEIGHTINGS = {
    "edm_code": _edm_eps_coefficients(edm_code_density),
    "edm_textbook": _edm_eps_coefficients(edm_textbook_density),
    "uniform": _uniform_eps_coefficients,
}
NEEDS_DT = {"edm_code", "edm_textbook"}


# ---------------------------------------------------------------------------------------------------------------
# Denoisers
# ---------------------------------------------------------------------------------------------------------------

class _Denoiser(nn.Module):
    """D from eps: D = x_noisy - sigma·eps^ (subclasses give eps_all_classes / eps)."""

    num_classes = None
    evaluations_per_input = 1

    def denoise_all_classes(self, x_noisy, sigma):
        s = sigma.to(x_noisy.dtype).reshape(-1, 1, 1, 1, 1)
        return x_noisy[:, None] - s * self.eps_all_classes(x_noisy, sigma)

    def denoise(self, x_noisy, sigma):
        return x_noisy - sigma.to(x_noisy.dtype).reshape(-1, 1, 1, 1) * self.eps(x_noisy, sigma)


def _one_hot_rows(count, classes, device):
    """[N·K, classes] one-hot rows for class 0..K-1 of each of `count` inputs (class-major inside an input)."""
    return torch.eye(classes, device=device).repeat(count, 1)


class EDMDenoiser(_Denoiser):
    """An NVlabs/edm network (EDMPrecond, RDC's, or VPPrecond): D(x; sigma, y) with one-hot labels y, eps^ in closed
    form (`noise_prediction`). The network computes in float32 (fp16 on CUDA when built so); outputs come back in
    the input's dtype. An unconditional network (label_dim 0) gives only `eps` / `denoise`; a conditional one only
    the class predictions (EDM's conditional models were not trained to drop labels)."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.num_classes = network.label_dim or None
        self.evaluations_per_input = self.num_classes or 1

    def eps_all_classes(self, x_noisy, sigma):
        if self.num_classes is None:
            raise ValueError("an unconditional EDM network has no class-conditional predictions")
        n, k = x_noisy.shape[0], self.num_classes
        x = x_noisy.repeat_interleave(k, dim=0)
        out = self.network.noise_prediction(x, sigma.repeat_interleave(k).to(torch.float32),
                                            _one_hot_rows(n, k, x.device))
        return out.to(x_noisy.dtype).reshape(n, k, *x_noisy.shape[1:])

    def _unconditional(self):
        if self.num_classes is not None:
            raise ValueError("likelihood maximization needs an unconditional denoiser; RDC uses EDM's unconditional "
                             "CIFAR-10 network (edm_cifar10_uncond_vp), not the conditional one")

    def eps(self, x_noisy, sigma):
        self._unconditional()
        return self.network.noise_prediction(x_noisy, sigma.to(torch.float32)).to(x_noisy.dtype)

    def denoise(self, x_noisy, sigma):
        self._unconditional()
        return self.network(x_noisy, sigma.to(torch.float32)).to(x_noisy.dtype)


class _ChainAdapter(_Denoiser):
    """sigma -> (chain state scale, network timestep, alpha_bar) on a `diffusion.GaussianDiffusion` chain, and a v
    network's output -> eps (see the module docstring)."""

    def __init__(self, diffusion, prediction):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.prediction = prediction
        alpha_bar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)
        timesteps = torch.as_tensor(diffusion.model_timesteps, dtype=torch.float64) * diffusion.timestep_scale
        self.register_buffer("chain_sigmas", (1.0 / alpha_bar - 1.0).sqrt(), persistent=False)
        self.register_buffer("chain_timesteps", timesteps, persistent=False)

    def network_timestep(self, sigma):
        """Network timestep (float64 [N]) of noise level sigma: linear in log sigma between the chain's levels."""
        levels = self.chain_sigmas.to(sigma.device).log()
        times = self.chain_timesteps.to(sigma.device)
        query = sigma.to(torch.float64).log()
        upper = torch.searchsorted(levels, query).clamp(1, len(levels) - 1)
        low, high = levels[upper - 1], levels[upper]
        frac = ((query - low) / (high - low)).clamp(0.0, 1.0)
        return times[upper - 1] + frac * (times[upper] - times[upper - 1])

    def _chain_inputs(self, x_noisy, sigma):
        alpha_bar = 1.0 / (1.0 + sigma.to(torch.float64) ** 2)
        x_t = x_noisy * alpha_bar.sqrt().to(x_noisy.dtype).reshape(-1, 1, 1, 1)
        return x_t, self.network_timestep(sigma).to(torch.float32), alpha_bar

    def _to_eps(self, out, x_t, alpha_bar):
        """out [N, ..., C, H, W] (the network's first C channels per head) -> eps."""
        if self.prediction == "eps":
            return out
        shape = (-1,) + (1,) * (out.dim() - 1)
        a = alpha_bar.to(out.dtype).reshape(shape)
        x_t = x_t.reshape(x_t.shape[0], *([1] * (out.dim() - x_t.dim())), *x_t.shape[1:])
        return a.sqrt() * out + (1 - a).sqrt() * x_t


class ChainDenoiser(_ChainAdapter):
    """A label-conditional eps (or v) network ``network(x_t, t_model, y=labels)`` on the chain `diffusion`, e.g.
    the mini ADM model: K network evaluations per input. `num_classes`: real classes 0..K-1; `null_class`: the label
    that label dropout trained as "no label" (the unconditional prediction); an unconditional network
    (`num_classes` None) is called without labels. Only the first C output channels are read (learned sigma off)."""

    def __init__(self, network, diffusion, *, num_classes=None, null_class=None, prediction="eps"):
        super().__init__(diffusion, prediction)
        self.network = network
        self.num_classes, self.null_class = num_classes, null_class
        self.evaluations_per_input = num_classes or 1

    def eps_all_classes(self, x_noisy, sigma):
        if self.num_classes is None:
            raise ValueError("an unconditional network has no class-conditional predictions")
        n, k, channels = x_noisy.shape[0], self.num_classes, x_noisy.shape[1]
        x_t, t_model, alpha_bar = self._chain_inputs(x_noisy, sigma)
        labels = torch.arange(k, device=x_noisy.device).repeat(n)
        out = self.network(x_t.repeat_interleave(k, dim=0), t_model.repeat_interleave(k), y=labels)
        out = out[:, :channels].reshape(n, k, *x_noisy.shape[1:])
        return self._to_eps(out, x_t, alpha_bar)

    def eps(self, x_noisy, sigma):
        channels = x_noisy.shape[1]
        x_t, t_model, alpha_bar = self._chain_inputs(x_noisy, sigma)
        if self.num_classes is None:
            out = self.network(x_t, t_model)
        elif self.null_class is not None:
            out = self.network(x_t, t_model, y=torch.full((x_t.shape[0],), self.null_class, device=x_t.device))
        else:
            raise ValueError("this class-conditional network has no null class, hence no unconditional prediction")
        return self._to_eps(out[:, :channels], x_t, alpha_bar)


class MultiheadDenoiser(_ChainAdapter):
    """RDC's multi-head network ``network(x_t, t_model)`` on the chain `diffusion`: its output holds one eps (or v)
    head per class (head k at channels k·C_out .. (k+1)·C_out - 1, `models.multihead_outputs`), so one network
    evaluation gives every class. It has no unconditional prediction."""

    def __init__(self, network, diffusion, *, num_classes, prediction="eps"):
        super().__init__(diffusion, prediction)
        self.network, self.num_classes = network, int(num_classes)
        self.evaluations_per_input = 1

    def eps_all_classes(self, x_noisy, sigma):
        x_t, t_model, alpha_bar = self._chain_inputs(x_noisy, sigma)
        heads = models.multihead_outputs(self.network, x_t, t_model, self.num_classes)[:, :, :x_noisy.shape[1]]
        return self._to_eps(heads, x_t, alpha_bar)

    def eps(self, x_noisy, sigma):
        raise ValueError("a multi-head network has no unconditional prediction; give likelihood maximization "
                         "another (unconditional) denoiser")


class EDMMultiheadDenoiser(_Denoiser):
    """A multi-head EDM network (`networks.edm.MultiheadEDMPrecond`, the distilled student of
    `training.distill_edm_multihead`): one pass gives eps^ of every head in closed form, head k being class k, so
    one network evaluation per input and sigma. Computes in float32 like `EDMDenoiser`; no unconditional
    prediction (LM needs another denoiser)."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.num_classes = int(network.heads)
        self.evaluations_per_input = 1

    def eps_all_classes(self, x_noisy, sigma):
        return self.network.noise_prediction(x_noisy, sigma.to(torch.float32)).to(x_noisy.dtype)

    def eps(self, x_noisy, sigma):
        raise ValueError("a multi-head network has no unconditional prediction; give likelihood maximization "
                         "another (unconditional) denoiser")


def denoiser_for(loaded, *, unconditional=False):
    """The denoiser adapter of a `models.LoadedModel`: EDM networks -> `EDMDenoiser`, multi-head EDM models ->
    `EDMMultiheadDenoiser`, other multi-head models -> `MultiheadDenoiser`, class-conditional project models (ADM,
    with their null class) -> `ChainDenoiser`. `unconditional`: for likelihood maximization (an unconditional
    network, or a conditional one's null class)."""
    family = models.family_of(loaded)
    if family.edm and loaded.kind == "multihead_diffusion":
        if unconditional:
            raise ValueError("a multi-head model has no unconditional prediction")
        return EDMMultiheadDenoiser(loaded.network)
    if family.edm:
        denoiser = EDMDenoiser(loaded.network)
        if unconditional != (denoiser.num_classes is None):
            raise ValueError(f"this EDM network is {'conditional' if denoiser.num_classes else 'unconditional'}; "
                             f"{'likelihood maximization' if unconditional else 'the classifier'} needs "
                             f"{'an unconditional' if unconditional else 'a class-conditional'} one")
        return denoiser
    if family.eps_adapter is not None or loaded.kind not in ("diffusion", "multihead_diffusion"):
        raise ValueError(f"no denoiser adapter for a {loaded.architecture['family']} {loaded.kind} model")
    prediction = (loaded.diffusion_settings or {}).get("prediction", "eps")
    if loaded.kind == "multihead_diffusion":
        if unconditional:
            raise ValueError("a multi-head model has no unconditional prediction")
        return MultiheadDenoiser(loaded.network, loaded.diffusion, num_classes=loaded.extra["num_classes"],
                                 prediction=prediction)
    num_classes = models.num_label_classes(loaded)
    if num_classes is None and not unconditional:
        raise ValueError("an unconditional diffusion model cannot classify")
    return ChainDenoiser(loaded.network, loaded.diffusion, num_classes=num_classes, null_class=loaded.null_class,
                         prediction=prediction)


# ---------------------------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------------------------

class DiffusionClassifier(nn.Module):
    """RDC's diffusion classifier: images in [0, 1] (N, C, H, W) -> logits (N, K) (module docstring).

    denoiser: an adapter (`EDMDenoiser`, `ChainDenoiser`, `MultiheadDenoiser`, `EDMMultiheadDenoiser`, or any
    object with that interface).
    sigma_grid: "edm" (sigma_min, sigma_max, sigma_steps: RDC's `torch.linspace(1e-4, 3, 1001)`, last point
    dropped) or "vp" (the denoiser's chain levels at table indices `timesteps`, default all: MultiHeadRDC's
    `ts = torch.arange(1000)`). weighting: one of `WEIGHTINGS` (default "edm_code" on "edm", "uniform" on "vp");
    P_mean, P_std, sigma_data: EDM's. seed: the noise of every call (recorded in `settings()`). chunk_size: network
    evaluations per batched call (at least one input's K); checkpoint: recompute each chunk in the backward pass.
    Gradients flow to the input only: without an input that requires grad, the forward runs under no_grad.
    """

    def __init__(self, denoiser, *, sigma_grid="edm", sigma_min=1e-4, sigma_max=3.0, sigma_steps=1001,
                 timesteps=None, weighting=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5, seed=0, chunk_size=64,
                 checkpoint=True):
        super().__init__()
        if sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"unknown sigma grid {sigma_grid!r}; choose one of {SIGMA_GRIDS}")
        weighting = weighting or DEFAULT_WEIGHTING[sigma_grid]
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {tuple(WEIGHTINGS)}")
        if sigma_grid == "vp" and weighting in NEEDS_DT:
            raise ValueError(f"weighting {weighting!r} is a Riemann sum over RDC's 'edm' sigma grid; the 'vp' grid "
                             "takes 'uniform' (MultiHeadRDC); for EDM-weighted multi-head logits use the 'edm' grid")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.denoiser = denoiser
        self.sigma_grid, self.weighting, self.seed = sigma_grid, weighting, int(seed)
        self.chunk_size, self.checkpoint = int(chunk_size), bool(checkpoint)
        self.grid_settings = {"sigma_min": sigma_min, "sigma_max": sigma_max, "sigma_steps": sigma_steps,
                              "timesteps": None if timesteps is None else [int(t) for t in timesteps],
                              "P_mean": P_mean, "P_std": P_std, "sigma_data": sigma_data}
        sigma, dt = self._grid(sigma_grid, sigma_min, sigma_max, sigma_steps, timesteps)
        coefficients = WEIGHTINGS[weighting](sigma, dt, P_mean, P_std, sigma_data)
        self.register_buffer("sigmas", sigma, persistent=False)
        self.register_buffer("eps_coefficients", coefficients, persistent=False)
        self._noise_cache = None

    def _grid(self, sigma_grid, sigma_min, sigma_max, sigma_steps, timesteps):
        if sigma_grid == "edm":
            return edm_sigma_grid(sigma_min, sigma_max, sigma_steps)
        chain = getattr(self.denoiser, "chain_sigmas", None)
        if chain is None:
            raise ValueError("the 'vp' sigma grid needs a denoiser on a diffusion chain (chain_sigmas)")
        index = torch.arange(len(chain)) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= len(chain):
            raise ValueError(f"timesteps must be table indices in 0..{len(chain) - 1}")
        return chain.detach().cpu()[index], None

    @property
    def num_classes(self):
        return self.denoiser.num_classes

    @property
    def weights(self):
        """w_i of the formula on ||D - x~||² (float64): eps_coefficients / sigma²."""
        return self.eps_coefficients / self.sigmas ** 2

    def network_evaluations(self):
        """Network evaluations per image of one forward: sigma points × the denoiser's evaluations per input."""
        return self.sigmas.numel() * self.denoiser.evaluations_per_input

    def settings(self):
        """What determines the logits, for run records."""
        return {"sigma_grid": self.sigma_grid, "weighting": self.weighting, "seed": self.seed,
                "sigma_points": self.sigmas.numel(), "network_evaluations": self.network_evaluations(),
                "chunk_size": self.chunk_size, "checkpoint": self.checkpoint, **self.grid_settings}

    def noise(self, image_shape, dtype, device):
        """The noise eps_i of every sigma point, [n, C, H, W]: the same at every call (seeded CPU draws)."""
        key = (tuple(image_shape), dtype, str(device))
        if self._noise_cache is None or self._noise_cache[0] != key:
            draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            noise = torch.randn((self.sigmas.numel(), *image_shape), generator=seeds.generator(self.seed),
                                dtype=draw_dtype)
            self._noise_cache = (key, noise.to(device, dtype))
        return self._noise_cache[1]

    def _chunk_errors(self, x_model, noise, sigmas, image_index, point_index):
        """mean_CHW (eps^_y - eps)² of the rows (image_index, point_index): [R, K]."""
        eps = noise[point_index]
        sigma = sigmas[point_index]
        x_noisy = x_model[image_index] + sigma.to(x_model.dtype).reshape(-1, 1, 1, 1) * eps
        predicted = self.denoiser.eps_all_classes(x_noisy, sigma)
        return ((predicted - eps[:, None]) ** 2).flatten(2).mean(dim=2)

    def squared_errors(self, x01):
        """mean_CHW ||eps^_y,i - eps_i||² for every image, sigma point and class: [N, n, K] (the logits are
        -sum_i eps_coefficients[i] · this)."""
        differentiate = torch.is_grad_enabled() and x01.requires_grad
        with torch.set_grad_enabled(differentiate):
            x_model = imagespace.to_model_space(x01)
            noise = self.noise(x01.shape[1:], x01.dtype, x01.device)
            sigmas = self.sigmas.to(x01.device)
            n, points = x01.shape[0], sigmas.numel()
            rows = torch.arange(n * points, device=x01.device)
            per_chunk = max(1, self.chunk_size // self.denoiser.evaluations_per_input)
            errors = []
            for chunk in rows.split(per_chunk):
                arguments = (x_model, noise, sigmas, chunk // points, chunk % points)
                if differentiate and self.checkpoint:
                    errors.append(torch.utils.checkpoint.checkpoint(self._chunk_errors, *arguments,
                                                                    use_reentrant=False))
                else:
                    errors.append(self._chunk_errors(*arguments))
            return torch.cat(errors).reshape(n, points, -1)

    def forward(self, x01):
        errors = self.squared_errors(x01)
        return -torch.einsum("nik,i->nk", errors, self.eps_coefficients.to(errors.device, errors.dtype))
