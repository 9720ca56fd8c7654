"""Training the models that the CPU presets (mini, smoke) build themselves, resumably and reproducibly.

Three jobs: a class-conditional diffusion model (`train_diffusion`), its fine-tuning, either continued as is or
turned into RDC's multi-head model (`finetune_diffusion`; from EDM's conditional CIFAR-10 model at paper scale by
distillation, `distill_edm_multihead`), and a classifier (`train_classifier`), plainly or with PGD adversarial
training (Madry et al.; `train_adversarial`, the same job with an `adversarial` block).

Reproducibility
---------------
Every random draw of step s (its batch order, timesteps, noise, label dropout, augmentation, and the global RNG
that dropout layers use) comes from seeds derived from (seed, s), so the result depends only on the seed and the
number of steps, never on when the job was interrupted. Deterministic algorithms are requested while training
(`torch.use_deterministic_algorithms`); on the CPU the result is then bit-identical across runs with the same
thread count (a different thread count may change float rounding in matrix products).

Device
------
Every job takes `device` ("cpu", the default here; "auto", "cuda", "cuda:N" as `device.resolve_device` reads
them): the network, its EMA, the optimizer state and each batch live there, while every random draw (batch order,
timesteps, noise, label dropout, augmentation, the initial weights) still comes from CPU generators and is moved,
so on the CPU the weights are bit-identical to those of the code before device support (tests/test_training.py
holds their digests). Dropout draws from the device's global generator, which the per-step seed also seeds. On
CUDA the job sets CUBLAS_WORKSPACE_CONFIG (`prepare_device`) and deterministic algorithms, so a rerun on the same
GPU model gives the same weights; they are not bit-equal to a CPU run (other kernels, other float rounding). Model
files always hold CPU tensors, and the returned LoadedModel is on the CPU; its `extra["device"]` says where it ran.

Resuming
--------
Every `checkpoint_every` steps the job writes `resume.pt` (network, EMA, optimizer, step, loss log, RNG and data
order state, and the job's identity) atomically. The identity is the job's config: every setting that changes the
weights, the sha256 of the dataset file (and the init network's digest for fine-tuning) and `TRAINING_VERSION`, the
version of this training code. A job that finds a resume file of the same identity continues from it and ends with
the same weights as an uninterrupted run; a resume file of another identity (or an unreadable one) is ignored and
replaced, with one log line naming what differs (`resumable.describe_mismatch`, the comparison every stage uses).
The resume file is deleted once the outputs are written.

Outputs (all written atomically): `model.pt` (`models.save_model`; EMA weights for diffusion models),
`loss.tsv` (step, mean loss since the previous row, cumulative training seconds) and, for classifiers,
`metrics.json` (with the training seconds and the device). `model.pt` holds the weights and what they depend on
(architecture, diffusion settings, training config, accuracies), never timings or the device, so two trainings
with the same seed write byte-identical files and downstream jobs keep their resumable state; the run's seconds
and device are in the returned model's `extra` (for the run record) and in loss.tsv / metrics.json.
"""

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffrobust import imagespace, models, resumable, seeds
from diffrobust.data import load_dataset
from diffrobust.device import describe as describe_device
from diffrobust.device import resolve_device
from diffrobust.download import file_digest
from diffrobust.diffusion import ddim_reverse
from diffrobust.io import atomic_path, atomic_write_json, atomic_write_text
from diffrobust.networks.adm import set_cpu_fast_path

log = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"
# Version of the training algorithms: part of every resume file's identity. Bump it when a code change would give
# other weights for the same config (a resumed run must not continue a state the new code would not have made).
TRAINING_VERSION = 2  # 2: seeds from diffrobust.seeds (the one derivation)
MODEL_FILE = "model.pt"
LOSS_FILE = "loss.tsv"
METRICS_FILE = "metrics.json"


# ---------------------------------------------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------------------------------------------

# "attack": the PGD random starts of adversarial training at step s; "evaluation": those of its test-split PGD check
STREAMS = {"order": 0, "step": 1, "global": 2, "init": 3, "attack": 4, "evaluation": 5}


def derived_seed(seed, index, stream):
    """A 63-bit seed for draw `index` of `stream` (a name of STREAMS) of a job seeded `seed`."""
    return seeds.derived_seed(seed, index, STREAMS[stream])


def generator_for(seed, index, stream):
    return seeds.generator(seed, index, STREAMS[stream])


@contextlib.contextmanager
def deterministic_algorithms():
    """Request deterministic algorithms for the enclosed block, restoring the previous setting afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def prepare_device(device):
    """The torch.device a training job runs on (`device.resolve_device`), made ready for deterministic training.

    cuBLAS matrix products are bit-reproducible only with a fixed workspace configuration (NVIDIA's cuBLAS docs,
    "Results reproducibility"; with the default one the workspace, and so the algorithm, can change between calls),
    and `torch.use_deterministic_algorithms(True)` refuses cuBLAS calls without one. CUBLAS_WORKSPACE_CONFIG=:4096:8
    is that setting. cuBLAS and PyTorch read it once, at the first cuBLAS use in the process, so it must be in the
    environment before CUDA work starts: hence here, at the top of every job, before any network is moved. A value
    the user set is kept (a non-deterministic one makes torch's deterministic mode raise, loudly). On the CPU the
    variable does nothing."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return resolve_device(device)


def network_digest(network):
    """sha256 of a network's state dict (keys, dtypes, shapes, values): identifies an init model in a config."""
    digest = hashlib.sha256()
    for key, value in network.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        # reshape(-1): a 0-dim buffer (batch norm's num_batches_tracked) cannot be viewed as bytes directly
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

class BatchStream:
    """Batches of one split in a seeded order that depends on the step alone.

    The order is an endless stream of permutations, one per epoch (epoch e is permuted with seed (seed, e)); step s
    takes positions s·B .. s·B + B - 1 of that stream, so a batch may span two epochs and the order of step s is
    known without replaying steps 0..s-1.
    """

    def __init__(self, images, labels, batch_size, seed, device="cpu"):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels)).long()
        self.batch_size = int(batch_size)
        self.seed = seed
        self.device = torch.device(device)
        self._permutations = {}

    def __len__(self):
        return len(self.labels)

    def _permutation(self, epoch):
        if epoch not in self._permutations:
            self._permutations = {key: value for key, value in self._permutations.items() if key >= epoch - 1}
            self._permutations[epoch] = torch.randperm(len(self), generator=generator_for(self.seed, epoch, "order"))
        return self._permutations[epoch]

    def position(self, step):
        """Data order state before step `step`: (epoch, index within that epoch's permutation)."""
        return divmod(step * self.batch_size, len(self))

    def rows(self, step):
        start = step * self.batch_size
        positions = range(start, start + self.batch_size)
        return torch.stack([self._permutation(p // len(self))[p % len(self)] for p in positions])

    def batch(self, step):
        """(images in [0, 1], labels) of step `step`, on the stream's device (the order is drawn on the CPU)."""
        rows = self.rows(step)
        images = self.images[rows].to(self.device)  # uint8 moves: a quarter of the bytes of float32
        return imagespace.uint8_to_float(images), self.labels[rows].to(self.device)


def _dataset_fingerprint(dataset_dir):
    return file_digest(Path(dataset_dir) / "splits.npz")


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------

def ema_decay_at(ema_decay, step):
    """EMA decay at step `step`: ema_decay, warmed up as min(ema_decay, (1 + s)/(10 + s)) so that a short run's
    average is not dominated by the random initialisation."""
    return min(ema_decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema, network, decay):
    for average, current in zip(ema.parameters(), network.parameters()):
        average.lerp_(current, 1.0 - decay)
    for average, current in zip(ema.buffers(), network.buffers()):
        average.copy_(current)


def warmup_constant(lr, warmup_steps):
    """lr(step): linear warmup over `warmup_steps`, then constant."""
    return lambda step: lr * min(1.0, (step + 1) / max(warmup_steps, 1))


def warmup_cosine(lr, warmup_steps, total_steps):
    """lr(step): linear warmup, then cosine decay to 0 at `total_steps`."""
    def schedule(step):
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return schedule


@dataclass
class LossLog:
    """Rows (step, mean loss since the previous row, seconds) and the running sum of the unlogged steps."""

    rows: list = field(default_factory=list)
    pending_sum: float = 0.0
    pending_count: int = 0

    def add(self, loss):
        self.pending_sum += loss
        self.pending_count += 1

    def flush(self, step, seconds):
        if self.pending_count:
            self.rows.append((step, self.pending_sum / self.pending_count, seconds))
        self.pending_sum, self.pending_count = 0.0, 0

    def tsv(self):
        lines = ["step\tloss\tseconds"] + [f"{step}\t{loss:.6g}\t{seconds:.2f}" for step, loss, seconds in self.rows]
        return "\n".join(lines) + "\n"


@dataclass
class TrainingResult:
    network: torch.nn.Module
    ema: torch.nn.Module
    loss_log: LossLog
    seconds: float
    resumed_from: int


def _read_resume(path, config):
    """The resume record at `path` if it was written with `config`, else None."""
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file from an older version of this code, or damaged by hand
        log.warning("ignoring unreadable resume file %s (%s)", path, error)
        return None
    stored = record.get("config") if isinstance(record, dict) else None
    if stored != config:
        log.warning("ignoring resume file %s and starting afresh: %s", path, resumable.describe_mismatch(stored, config))
        return None
    return record


def run_training(out_dir, *, config, network, loss_fn, steps, lr_schedule, seed, ema_decay=None,
                 checkpoint_every=100, log_every=10, optimizer="adam", weight_decay=0.0, data_stream=None,
                 description="training", on_step=None):
    """The resumable loop shared by every job; returns a TrainingResult.

    loss_fn(step, generator) -> scalar loss of step `step` (draws its randomness from `generator`). config: a
    JSON-like dict identifying the job (a resume file must carry the same one). on_step(step_done) is called
    after each step (and after its resume checkpoint, if any): a hook for progress reports and for tests.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_path = out_dir / RESUME_FILE
    config = resumable.canonical({**config, "code_version": TRAINING_VERSION})
    parameters = [p for p in network.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.AdamW(parameters, lr=lr_schedule(0), weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(parameters, lr=lr_schedule(0), momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    ema = copy.deepcopy(network).requires_grad_(False) if ema_decay is not None else None
    losses, start, seconds_before = LossLog(), 0, 0.0

    record = _read_resume(resume_path, config)
    if record is not None:
        network.load_state_dict(record["network"])
        if ema is not None:
            ema.load_state_dict(record["ema"])
        opt.load_state_dict(record["optimizer"])
        torch.set_rng_state(record["rng_state"])
        losses = LossLog([tuple(row) for row in record["loss_rows"]], *record["pending_loss"])
        start, seconds_before = record["step"], record["seconds"]
        log.info("%s: resuming from step %d of %d (%s)", description, start, steps, resume_path)

    def save_resume(step, seconds):
        state = {
            "config": config, "step": step, "seconds": seconds,
            "network": network.state_dict(), "ema": None if ema is None else ema.state_dict(),
            "optimizer": opt.state_dict(), "rng_state": torch.get_rng_state(),
            "data_position": None if data_stream is None else list(data_stream.position(step)),
            "loss_rows": [list(row) for row in losses.rows],
            "pending_loss": [losses.pending_sum, losses.pending_count],
        }
        with atomic_path(resume_path) as temp:
            torch.save(state, temp)
        atomic_write_text(out_dir / LOSS_FILE, losses.tsv())

    network.train()
    clock = time.perf_counter()
    with deterministic_algorithms(), tqdm(total=steps, initial=start, desc=description, file=sys.stderr,
                                          mininterval=5.0, dynamic_ncols=True) as progress:
        for step in range(start, steps):
            torch.manual_seed(derived_seed(seed, step, "global"))  # dropout layers draw from the global RNG
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step)
            loss = loss_fn(step, generator_for(seed, step, "step"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                update_ema(ema, network, ema_decay_at(ema_decay, step))
            done = step + 1
            losses.add(loss.item())
            seconds = seconds_before + time.perf_counter() - clock
            if done % log_every == 0 or done == steps:
                losses.flush(done, seconds)
                progress.set_postfix(loss=f"{losses.rows[-1][1]:.4f}", refresh=False)
            if done % checkpoint_every == 0 and done < steps:
                save_resume(done, seconds)
            progress.update(1)
            if on_step is not None:
                on_step(done)
    network.eval()
    if ema is not None:
        ema.eval()
    return TrainingResult(network, ema, losses, seconds_before + time.perf_counter() - clock, start)


def _with_run_facts(loaded, seconds, device):
    """The LoadedModel of a finished job with this run's facts added to its `extra` in memory (`seconds`,
    `device`: what the CLI puts in the run record). The model file leaves them out: it holds only what the weights
    depend on, so a retrained identical model is a byte-identical file, and the attack and certification jobs
    that digest it keep their resumable state (`resumable`)."""
    return dataclasses.replace(loaded, extra={**loaded.extra, "seconds": round(seconds, 2),
                                              "device": describe_device(device, "fp32")})


def _finish_outputs(out_dir, losses):
    atomic_write_text(Path(out_dir) / LOSS_FILE, losses.tsv())


def _remove_resume(out_dir):
    (Path(out_dir) / RESUME_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Diffusion models
# ---------------------------------------------------------------------------------------------------------------

def generator_device(generator):
    """Where `generator` draws (the CPU for None, torch's default generator): draws are made there and moved."""
    return torch.device("cpu") if generator is None else generator.device


class NoiseTable:
    """sqrt(alpha_bar) and sqrt(1 - alpha_bar) of every level as float32 CPU tensors, for drawing training pairs;
    `at` looks them up and moves them to the device of the batch."""

    def __init__(self, gaussian_diffusion):
        alphas_cumprod = torch.from_numpy(gaussian_diffusion.alphas_cumprod)
        self.sqrt_alpha_bar = alphas_cumprod.sqrt().float()
        self.sqrt_one_minus_alpha_bar = (1.0 - alphas_cumprod).sqrt().float()
        self.num_levels = gaussian_diffusion.num_levels
        self.timestep_scale = gaussian_diffusion.timestep_scale

    def at(self, index, like):
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) at table indices `index`, shaped to broadcast against `like`
        (one value per sample) and on its device."""
        index = index.to(self.sqrt_alpha_bar.device)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return (self.sqrt_alpha_bar[index].view(shape).to(like.device),
                self.sqrt_one_minus_alpha_bar[index].view(shape).to(like.device))

    def noisy(self, x0, generator):
        """(x_t, noise, t_model): table index i ~ U{0..T-1} per sample, x_t ~ q at that level, and the network
        timestep i·scale (diffusion.py queries level i + 1 at timestep i, so training uses the same). Index and
        noise are drawn on the generator's device and moved to x0's."""
        where = generator_device(generator)
        index = torch.randint(0, self.num_levels, (x0.shape[0],), generator=generator, device=where)
        noise = torch.randn(x0.shape, generator=generator, device=where).to(x0.device)
        signal, spread = self.at(index, x0)
        x_t = signal * x0 + spread * noise
        return x_t, noise, index.to(x0.device).float() * self.timestep_scale


def drop_labels(labels, label_dropout, null_class, generator):
    """Replace each label by the null class with probability `label_dropout` (classifier-free guidance training)."""
    dropped = torch.rand(labels.shape, generator=generator, device=generator_device(generator)) < label_dropout
    dropped = dropped.to(labels.device)
    return torch.where(dropped, torch.full_like(labels, null_class), labels)


def prediction_target(table, x0, noise, t_model, prediction):
    """What the network's first C channels are trained to output: eps, or v = sqrt(a)·eps - sqrt(1 - a)·x0."""
    if prediction == "eps":
        return noise
    signal, spread = table.at((t_model / table.timestep_scale).round().long(), x0)
    return signal * noise - spread * x0


def eps_mse_loss(network, table, x0, labels, generator, label_dropout=0.0, null_class=None, prediction="eps"):
    """The simple loss of Ho et al.: mean squared error of the eps prediction (first C output channels); with
    prediction "v" the same on v (Salimans & Ho), i.e. the eps error weighted by 1/alpha_bar."""
    x_t, noise, t_model = table.noisy(x0, generator)
    if label_dropout:
        labels = drop_labels(labels, label_dropout, null_class, generator)
    out = network(x_t, t_model, y=labels)[:, : x0.shape[1]]
    return F.mse_loss(out, prediction_target(table, x0, noise, t_model, prediction))


def conditional_unet_architecture(architecture, in_channels, image_size, num_classes):
    """Fill the dataset-given keys of an `adm_unet` block (image channels and size, classes + 1 null class) and
    check any that were given."""
    if architecture.get("family") != "adm_unet":
        raise ValueError(f"train_diffusion trains 'adm_unet' networks, got family {architecture.get('family')!r}")
    config = dict(architecture.get("config", {}))
    required = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes + 1,
                "class_cond": True, "output_heads": 1}
    for key, value in required.items():
        if config.setdefault(key, value) != value:
            raise ValueError(f"architecture config {key}={config[key]!r} does not fit the dataset (needs {value!r})")
    if config.get("learn_sigma", False):
        raise ValueError("learn_sigma training (the hybrid loss) is not implemented: the CPU presets use fixed "
                         "variances; set learn_sigma: false")
    return {"family": "adm_unet", "config": config}


def _dataset_shape(dataset):
    train = dataset["train"]
    return train.images.shape[1], train.images.shape[2], int(dataset.meta["num_classes"])


def train_diffusion(dataset_dir, out_dir, *, architecture, schedule="linear", num_timesteps=1000, steps, batch_size,
                    lr, ema_decay, label_dropout, seed, checkpoint_every=200, log_every=20, warmup_steps=100,
                    variance="fixed_small", prediction="eps", device="cpu", on_step=None):
    """Train a class-conditional ADM UNet (K classes + null class K) with the eps-MSE loss; writes model.pt (EMA
    weights, kind "diffusion") and loss.tsv under out_dir. Returns the LoadedModel of the EMA network.

    architecture: an `adm_unet` block; in_channels, image_size and num_classes (K + 1) are filled from the dataset.
    learn_sigma stays False: every method here uses eps only (one-shot denoising, DDIM, the VP-SDE, RDC's ELBO),
    and the ancestral samplers take a fixed variance (`variance`), which spares the hybrid loss's extra cost.
    variance "fixed_small" (the posterior variance) is the default because DensePure's few-step respaced reverse
    with "fixed_large" (beta of the respaced step) adds about twice the posterior's noise at the intermediate
    step: on the mini model that cut the accuracy of the 2-step reverse at sigma 0.25 from 98% to 47%.
    label_dropout: probability of training a sample with the null class, which makes the unconditional eps.
    device: where the network and batches go (module docstring, "Device").
    """
    device = prepare_device(device)
    dataset = load_dataset(dataset_dir)
    channels, size, num_classes = _dataset_shape(dataset)
    architecture = conditional_unet_architecture(architecture, channels, size, num_classes)
    settings = models.diffusion_settings(schedule, num_timesteps, null_class=num_classes, variance=variance,
                                         prediction=prediction)
    config = {"job": "train_diffusion", "dataset": _dataset_fingerprint(dataset_dir), "architecture": architecture,
              "diffusion": settings, "steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
              "label_dropout": label_dropout, "seed": seed, "warmup_steps": warmup_steps, "log_every": log_every}
    torch.manual_seed(derived_seed(seed, 0, "init"))
    network = models.build_architecture(architecture).to(device)  # initialised on the CPU: the same on every device
    table = NoiseTable(models.build_diffusion(settings))
    stream = BatchStream(dataset["train"].images, dataset["train"].labels, batch_size, seed, device)

    def loss_fn(step, generator):
        x01, labels = stream.batch(step)
        return eps_mse_loss(network, table, imagespace.to_model_space(x01), labels, generator,
                            label_dropout, num_classes, prediction)

    result = run_training(out_dir, config=config, network=network, loss_fn=loss_fn, steps=steps,
                          lr_schedule=warmup_constant(lr, warmup_steps), seed=seed, ema_decay=ema_decay,
                          checkpoint_every=checkpoint_every, log_every=log_every, data_stream=stream,
                          description="diffusion", on_step=on_step)
    extra = {"num_classes": num_classes, "class_names": dataset.meta.get("class_names"), "training": config}
    path = models.save_model(Path(out_dir) / MODEL_FILE, result.ema, kind="diffusion", architecture=architecture,
                             diffusion=settings, extra=extra)
    _finish_outputs(out_dir, result.loss_log)
    _remove_resume(out_dir)
    return _with_run_facts(models.load_model(path), result.seconds, device)


def multihead_from_conditional(network, num_classes, fold_label=None):
    """RDC's multi-head UNet initialised from a class-conditional ADM network -> (multihead network, architecture).

    The multi-head network is the same UNet without a label embedding, whose output convolution has one copy of the
    conditional network's output convolution per class (head k = output channels k·C_out .. (k+1)·C_out - 1).
    Every other weight is copied. The conditional network adds label_emb(y) to the timestep embedding, i.e. to the
    output of time_embed's last linear layer; with `fold_label` = c that row is added to that layer's bias, so
    before fine-tuning every head computes exactly the conditional network's eps(x, t, c) (up to float rounding of
    the moved addition). Folding the null class makes every head start at the unconditional eps, from which
    fine-tuning teaches head k the class-k eps. Heads reproduce eps(x, t, k) for k != c only where label_emb(k)
    equals label_emb(c).
    """
    if getattr(network, "num_classes", None) is None:
        raise ValueError("multi-head initialisation needs a class-conditional ADM network (one with label_emb)")
    flags = models.adm_unet_config_of(network)
    flags.update({"class_cond": False, "output_heads": num_classes})
    flags.pop("num_classes")
    architecture = {"family": "adm_unet", "config": flags}
    multihead = models.build_architecture(architecture)
    source = network.state_dict()
    target = multihead.state_dict()
    for key in target:
        if key in ("out.2.weight", "out.2.bias"):
            # head k owns output channels k·C_out .. (k+1)·C_out - 1: stack K copies of the output layer
            target[key] = source[key].repeat(num_classes, *([1] * (source[key].dim() - 1)))
        else:
            target[key] = source[key].clone()
    if fold_label is not None:
        target["time_embed.2.bias"] = target["time_embed.2.bias"] + source["label_emb.weight"][fold_label]
    multihead.load_state_dict(target, strict=True)
    return multihead.train(network.training), architecture  # in the source's mode (dropout on or off)


def teacher_class_eps(teacher, x_t, t_model, classes, channels):
    """eps(x_t[i], t[i], classes[i, j]) of a class-conditional network in one batched pass: [N, M, C, H, W] for
    class indices `classes` of shape [N, M]."""
    n, m = classes.shape
    out = teacher(x_t.repeat_interleave(m, dim=0), t_model.repeat_interleave(m), y=classes.reshape(-1))
    return out[:, :channels].reshape(n, m, channels, *x_t.shape[2:])


def teacher_all_class_eps(teacher, x_t, t_model, num_classes, channels):
    """eps(x_t, t, k) of a class-conditional network for k = 0..K-1 in one batched pass: [N, K, C, H, W]."""
    classes = torch.arange(num_classes, device=x_t.device).repeat(x_t.shape[0], 1)
    return teacher_class_eps(teacher, x_t, t_model, classes, channels)


def distilled_classes(count, num_classes, distill_classes, generator):
    """[count, m] class indices of the heads distilled for each of `count` samples: all K in order when
    distill_classes is None or >= K, else m = distill_classes drawn uniformly without replacement per sample (drawn
    on the generator's device)."""
    if distill_classes is None or distill_classes >= num_classes:
        return torch.arange(num_classes).repeat(count, 1)
    draws = torch.rand(count, num_classes, generator=generator, device=generator_device(generator))
    return draws.argsort(dim=1)[:, :distill_classes]


def multihead_loss(student, teacher, table, x0, labels, generator, num_classes, true_class_weight=1.0,
                   distill_classes=None, prediction="eps"):
    """RDC's multi-head fine-tuning loss: heads match the frozen conditional teacher's eps(x_t, t, k) (mean squared
    error over heads), plus `true_class_weight` x the usual eps-MSE of the true class's head.

    distill_classes: None distils every head of every sample (K teacher passes per image); m < K distils m heads
    per sample drawn uniformly without replacement, an unbiased estimate of the same loss at m/K of the teacher's
    cost (the teacher dominates the step time), so more images fit in the same time.
    """
    channels, n = x0.shape[1], x0.shape[0]
    x_t, noise, t_model = table.noisy(x0, generator)
    heads = models.multihead_outputs(student, x_t, t_model, num_classes)[:, :, :channels]
    classes = distilled_classes(n, num_classes, distill_classes, generator).to(x0.device)
    with torch.no_grad():
        targets = teacher_class_eps(teacher, x_t, t_model, classes, channels)
    rows = torch.arange(n, device=x0.device)
    distillation = F.mse_loss(heads[rows[:, None], classes], targets)
    true_head = heads[rows, labels]
    # teacher and student share the parameterisation (eps or v), so the distillation compares raw outputs
    target = prediction_target(table, x0, noise, t_model, prediction)
    return distillation + true_class_weight * F.mse_loss(true_head, target)


def _as_loaded(init_model):
    return init_model if isinstance(init_model, models.LoadedModel) else models.load_model(init_model)


def finetune_diffusion(init_model, dataset_dir, out_dir, *, variant, steps, batch_size, lr, ema_decay, seed,
                       label_dropout=None, true_class_weight=1.0, distill_classes=None, checkpoint_every=200,
                       log_every=20, warmup_steps=0, device="cpu", on_step=None):
    """Continue training a diffusion model (a model file path or a LoadedModel); writes model.pt and loss.tsv.

    variant="conditional": the same network, more steps of the eps-MSE loss with label dropout (default: the
        rate the init model was trained with; a model without a null class needs 0).
    variant="multihead": RDC's multi-head network (`multihead_from_conditional`, null class folded in when there
        is one), trained with `multihead_loss` against the frozen init model; saved as kind "multihead_diffusion"
        with the init model's diffusion settings (null_class None: it has no unconditional output). An EDM init
        model (EDM's conditional CIFAR-10 network at paper scale) is distilled instead (`distill_edm_multihead`,
        which takes the same keywords but label_dropout).
    device: where the networks (trained and frozen teacher) and batches go (module docstring, "Device").
    """
    device = prepare_device(device)
    loaded = _as_loaded(init_model)
    if variant == "multihead" and models.family_of(loaded).edm:
        if label_dropout is not None:
            raise ValueError("label_dropout is a setting of variant 'conditional'; the multi-head model has no labels")
        return distill_edm_multihead(
            loaded, dataset_dir, out_dir, steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, seed=seed,
            true_class_weight=true_class_weight, distill_classes=distill_classes, checkpoint_every=checkpoint_every,
            log_every=log_every, warmup_steps=warmup_steps, device=device, on_step=on_step)
    if loaded.kind != "diffusion" or not models.family_of(loaded).trainable:
        raise ValueError("finetune_diffusion takes an ADM diffusion model (mini model or ADM checkpoint), or for "
                         "variant 'multihead' a class-conditional EDM model")
    dataset = load_dataset(dataset_dir)
    _, _, num_classes = _dataset_shape(dataset)
    settings = dict(loaded.diffusion_settings)
    null_class = settings.get("null_class")
    prediction = settings.get("prediction", "eps")
    trained_with = (loaded.extra.get("training") or {}).get("label_dropout", 0.0)
    config = {"job": "finetune_diffusion", "variant": variant, "init": network_digest(loaded.network),
              "dataset": _dataset_fingerprint(dataset_dir), "steps": steps, "batch_size": batch_size, "lr": lr,
              "ema_decay": ema_decay, "seed": seed, "warmup_steps": warmup_steps, "log_every": log_every}
    table = NoiseTable(loaded.diffusion)
    stream = BatchStream(dataset["train"].images, dataset["train"].labels, batch_size, seed, device)
    teacher = loaded.network.eval().requires_grad_(False).to(device)

    if variant == "conditional":
        label_dropout = trained_with if label_dropout is None else label_dropout
        if label_dropout and null_class is None:
            raise ValueError("label dropout needs a model with a null class")
        config["label_dropout"] = label_dropout
        network = copy.deepcopy(teacher).requires_grad_(True)
        architecture, kind = loaded.architecture, "diffusion"

        def loss_fn(step, generator):
            x01, labels = stream.batch(step)
            return eps_mse_loss(network, table, imagespace.to_model_space(x01), labels, generator,
                                label_dropout, null_class, prediction)
    elif variant == "multihead":
        if num_label := models.num_label_classes(loaded):
            if num_label != num_classes:
                raise ValueError(f"the init model knows {num_label} classes, the dataset has {num_classes}")
        config.update({"true_class_weight": true_class_weight, "distill_classes": distill_classes})
        network, architecture = multihead_from_conditional(teacher, num_classes, fold_label=null_class)
        network.requires_grad_(True).to(device)
        kind = "multihead_diffusion"
        settings["null_class"] = None
        # The teacher's eval-mode targets by the official steps, so that the fine-tuned weights stay bit-identical
        # to those of the code before the ADM UNet's CPU fast path (its outputs differ from these by ~1e-7).
        set_cpu_fast_path(teacher, False)

        def loss_fn(step, generator):
            x01, labels = stream.batch(step)
            return multihead_loss(network, teacher, table, imagespace.to_model_space(x01), labels, generator,
                                  num_classes, true_class_weight, distill_classes, prediction)
    else:
        raise ValueError(f"variant must be 'conditional' or 'multihead', got {variant!r}")

    result = run_training(out_dir, config=config, network=network, loss_fn=loss_fn, steps=steps,
                          lr_schedule=warmup_constant(lr, warmup_steps), seed=seed, ema_decay=ema_decay,
                          checkpoint_every=checkpoint_every, log_every=log_every, data_stream=stream,
                          description=f"finetune ({variant})", on_step=on_step)
    return _save_finetuned(out_dir, result, loaded=loaded, dataset=dataset, config=config, kind=kind,
                           architecture=architecture, settings=settings, device=device)


def _save_finetuned(out_dir, result, *, loaded, dataset, config, kind, architecture, settings, device):
    """Write a fine-tuned model's outputs (model.pt of the EMA weights, loss.tsv), remove the resume file and
    return the LoadedModel."""
    extra = {"num_classes": int(dataset.meta["num_classes"]), "class_names": dataset.meta.get("class_names"),
             "training": config, "init_training": loaded.extra.get("training")}
    path = models.save_model(Path(out_dir) / MODEL_FILE, result.ema, kind=kind, architecture=architecture,
                             diffusion=settings, extra=extra)
    _finish_outputs(out_dir, result.loss_log)
    _remove_resume(out_dir)
    return _with_run_facts(models.load_model(path), result.seconds, device)


# ---------------------------------------------------------------------------------------------------------------
# RDC's multi-head model distilled from EDM's class-conditional model (paper scale; this project's recipe, an
# inference: no official multi-head checkpoint or training code is public; docs/fidelity.md)
# ---------------------------------------------------------------------------------------------------------------

# EDM's training distribution of noise levels (Karras et al. 2022, EDMLoss): ln sigma ~ N(P_mean, P_std²).
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2
# Teacher weights that the student has no place for: its label input (the label is the head instead).
EDM_LABEL_KEYS = {"model.map_label.weight", "model.map_label.bias"}


def mean_label_embedding(teacher):
    """The teacher's label embedding of the soft label (1/K, ..., 1/K), as SongUNet.embed computes it (labels times
    sqrt(K), then the affine map_label): the mean of the K class embeddings, [noise_channels]."""
    k = teacher.label_dim
    with torch.no_grad():
        return teacher.model.map_label(torch.full((1, k), 1.0 / k) * np.sqrt(k))[0]


def edm_multihead_from_conditional(teacher, config):
    """RDC's multi-head network initialised from a class-conditional EDMPrecond network -> (student, architecture).

    config: the teacher's `edm_vp_songunet` config. The student (`edm_multihead_songunet`) is the same SongUNet
    without a label input and with K = label_dim heads (output channels K·C). Every teacher weight of the same shape
    is copied; each output convolution (`*_aux_conv`, one per level with decoder_type 'skip') is repeated once per
    head, head k = output channels k·C .. (k+1)·C - 1. The label only enters as map_label's embedding added to the
    noise embedding before map_layer0, an input every block shares, so at step 0 all heads are one function;
    folding the mean class embedding e (`mean_label_embedding`) into map_layer0's bias (+ W0·e) makes that function
    exactly the teacher with the soft label (1/K, ..., 1/K): D_k(x; sigma) = D_teacher(x; sigma, 1/K) for every head
    k, up to the float rounding of the moved addition. Why that point: the mean minimises the mean squared distance
    to the K class embeddings, so it is the shared start nearest to every head's target at the layer where they
    differ, and closer than the all-zero label EDM passes for "no label" (by the squared distance from the mean to
    map_label's bias), which EDM's conditional model never saw (EDM's train.py sets no label dropout).
    """
    if getattr(teacher, "precond", None) != "edm" or not teacher.label_dim:
        raise ValueError("multi-head distillation needs a class-conditional EDMPrecond teacher (precond 'edm', "
                         "label_dim > 0), e.g. edm_cifar10_cond_vp")
    heads = teacher.label_dim
    dropped = ("precond", "label_dim", "label_dropout")  # always EDMPrecond, and no label input
    student_config = {key: value for key, value in config.items() if key not in dropped}
    architecture = {"family": "edm_multihead_songunet", "config": {**student_config, "heads": heads}}
    student = models.build_architecture(architecture)
    source, target = teacher.state_dict(), student.state_dict()
    if set(source) - set(target) != EDM_LABEL_KEYS or set(target) - set(source):
        raise ValueError("the teacher's weights do not map onto the multi-head student's (config mismatch)")
    for key in target:
        weight = source[key]
        # head k owns output channels k·C .. (k+1)·C - 1: K copies of each output convolution
        target[key] = weight.clone() if weight.shape == target[key].shape else \
            weight.repeat(heads, *([1] * (weight.dim() - 1)))
    fold = source["model.map_layer0.weight"] @ mean_label_embedding(teacher)
    target["model.map_layer0.bias"] = source["model.map_layer0.bias"] + fold
    student.load_state_dict(target, strict=True)
    return student.train(teacher.training), architecture


def edm_loss_weight(sigma, sigma_data):
    """EDM's lambda(sigma) = (sigma² + sd²)/(sigma·sd)²: under it the squared error of D is that of the U-Net output
    F (lambda·c_out² = 1), so every noise level's error counts in the same units."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_noisy(x0, generator, P_mean=EDM_P_MEAN, P_std=EDM_P_STD):
    """(x0 + sigma·n, sigma) with ln sigma ~ N(P_mean, P_std²) per sample and n ~ N(0, I), drawn on the generator's
    device (sigma first) and moved to x0's."""
    where = generator_device(generator)
    sigma = (torch.randn(x0.shape[0], generator=generator, device=where) * P_std + P_mean).exp().to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=where).to(x0.device)
    return x0 + sigma.view(-1, 1, 1, 1) * noise, sigma


def teacher_class_denoised(teacher, x_noisy, sigma, classes):
    """D(x_noisy[i]; sigma[i], classes[i, j]) of a class-conditional EDM network (one-hot labels) in one batched
    pass: [N, M, C, H, W] for class indices of shape [N, M]."""
    n, m = classes.shape
    labels = F.one_hot(classes.reshape(-1), teacher.label_dim).to(x_noisy.dtype)
    out = teacher(x_noisy.repeat_interleave(m, dim=0), sigma.repeat_interleave(m), labels)
    return out.reshape(n, m, *x_noisy.shape[1:])


def edm_multihead_loss(student, teacher, x0, labels, generator, true_class_weight=1.0, distill_classes=None):
    """`multihead_loss` in EDM's space: sigma from EDM's training distribution (`edm_noisy`), every (or
    `distill_classes` random) head's D_k(x0 + sigma·n; sigma) against the frozen teacher's D(·; sigma, k), plus
    `true_class_weight` x EDM's own denoising loss of the true class's head against x0; both weighted by EDM's
    lambda(sigma) and averaged over pixels (EDM sums them: a constant factor, which Adam does not see)."""
    n = x0.shape[0]
    x_noisy, sigma = edm_noisy(x0, generator)
    classes = distilled_classes(n, student.heads, distill_classes, generator).to(x0.device)
    heads = student(x_noisy, sigma)
    with torch.no_grad():
        targets = teacher_class_denoised(teacher, x_noisy, sigma, classes)
    weight = edm_loss_weight(sigma, student.sigma_data).view(-1, 1, 1, 1)
    rows = torch.arange(n, device=x0.device)
    distillation = (weight[:, None] * (heads[rows[:, None], classes] - targets) ** 2).mean()
    return distillation + true_class_weight * (weight * (heads[rows, labels] - x0) ** 2).mean()


def distill_edm_multihead(loaded, dataset_dir, out_dir, *, steps, batch_size, lr, ema_decay, seed,
                          true_class_weight=1.0, distill_classes=None, checkpoint_every=200, log_every=20,
                          warmup_steps=0, device="cpu", on_step=None):
    """RDC's multi-head model distilled from a class-conditional EDMPrecond model `loaded` (a LoadedModel; EDM's
    CIFAR-10 network at paper scale) on the dataset's train split; writes model.pt (EMA weights, kind
    "multihead_diffusion", family edm_multihead_songunet, the teacher's diffusion settings with null_class None)
    and loss.tsv; returns the LoadedModel. The `finetune_diffusion(variant="multihead")` of an EDM model.

    Student and init: `edm_multihead_from_conditional`; loss: `edm_multihead_loss` against the frozen teacher;
    AdamW (no weight decay) with linear warm-up, EMA, resumable as every job here (module docstring). The student
    keeps the teacher's dropout.
    """
    device = prepare_device(device)
    dataset = load_dataset(dataset_dir)
    _, _, num_classes = _dataset_shape(dataset)
    if models.num_label_classes(loaded) != num_classes:
        raise ValueError(f"the teacher knows {models.num_label_classes(loaded)} classes, the dataset has "
                         f"{num_classes}")
    config = {"job": "finetune_diffusion", "variant": "multihead", "recipe": "edm_distillation",
              "init": network_digest(loaded.network), "dataset": _dataset_fingerprint(dataset_dir), "steps": steps,
              "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "seed": seed, "warmup_steps": warmup_steps,
              "log_every": log_every, "true_class_weight": true_class_weight, "distill_classes": distill_classes,
              "P_mean": EDM_P_MEAN, "P_std": EDM_P_STD}
    student, architecture = edm_multihead_from_conditional(loaded.network, loaded.architecture["config"])
    student.requires_grad_(True).to(device)
    teacher = loaded.network.eval().requires_grad_(False).to(device)
    stream = BatchStream(dataset["train"].images, dataset["train"].labels, batch_size, seed, device)

    def loss_fn(step, generator):
        x01, labels = stream.batch(step)
        return edm_multihead_loss(student, teacher, imagespace.to_model_space(x01), labels, generator,
                                  true_class_weight, distill_classes)

    result = run_training(out_dir, config=config, network=student, loss_fn=loss_fn, steps=steps,
                          lr_schedule=warmup_constant(lr, warmup_steps), seed=seed, ema_decay=ema_decay,
                          checkpoint_every=checkpoint_every, log_every=log_every, data_stream=stream,
                          description="multi-head distillation (EDM)", on_step=on_step)
    settings = {**loaded.diffusion_settings, "null_class": None}
    return _save_finetuned(out_dir, result, loaded=loaded, dataset=dataset, config=config,
                           kind="multihead_diffusion", architecture=architecture, settings=settings, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Classifiers
# ---------------------------------------------------------------------------------------------------------------

def random_shift(x, max_shift, generator):
    """Translate each image by up to `max_shift` pixels in each direction, filling with zeros (MNIST's background);
    no flips, since digits are not mirror-symmetric."""
    if max_shift == 0:
        return x
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator,
                            device=generator_device(generator))
    height, width = x.shape[-2:]
    return torch.stack([padded[i, :, top:top + height, left:left + width]
                        for i, (top, left) in enumerate(offsets.tolist())])


def random_affine(x, max_shift, max_rotation_degrees, max_scale_change, generator):
    """Random rotation (uniform in +-max_rotation_degrees), scaling (factor in 1 +- max_scale_change) and translation
    (uniform in +-max_shift pixels) per image, bilinear, zero fill: the usual MNIST augmentation."""
    n, _, height, width = x.shape
    draws = torch.rand(n, 4, generator=generator, device=generator_device(generator)).to(x.device)
    draws = draws * 2 - 1  # rotation, scale, shift x, shift y in [-1, 1]
    angle = draws[:, 0] * math.radians(max_rotation_degrees)
    scale = 1 + draws[:, 1] * max_scale_change
    # affine_grid maps output coordinates (in [-1, 1]) to input coordinates: the inverse of the image transform.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift_x = -draws[:, 2] * max_shift * 2 / width
    shift_y = -draws[:, 3] * max_shift * 2 / height
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


AUGMENTATIONS = ("none", "shift", "affine")


def module_device(module):
    """The device of a module's first parameter or buffer (the CPU for a module without either)."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


@torch.no_grad()
def accuracy(network, images_uint8, labels, batch_size=500):
    """Top-1 accuracy of a [0, 1] -> logits classifier on uint8 images (batches go to the network's device)."""
    network.eval()
    device = module_device(network)
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = imagespace.uint8_to_float(torch.as_tensor(images_uint8[start:start + batch_size]).to(device))
        predictions = network(x).argmax(dim=1).cpu()
        correct += int((predictions == torch.as_tensor(labels[start:start + batch_size])).sum())
    return correct / len(labels)


# ---------------------------------------------------------------------------------------------------------------
# Adversarial training (Madry et al.)
# ---------------------------------------------------------------------------------------------------------------

# The PGD of adversarial training; the defaults suit MNIST at the mini presets' l-inf budget 0.1 (Madry et al.'s
# MNIST model: eps 0.3, 40 steps of 0.01 with a random start; here 7 steps of eps/4 fit the CPU budget).
ADVERSARIAL_DEFAULTS = {"threat": "linf", "eps": 0.1, "step_size": 0.025, "steps": 7, "random_start": True,
                        "adversarial_fraction": 1.0}


def adversarial_settings(**settings):
    """The PGD block of adversarial training with ADVERSARIAL_DEFAULTS filled in, checked: threat "linf" or "l2",
    eps and step_size > 0 (in [0, 1] image units), steps >= 1, adversarial_fraction in [0, 1] (the share of each
    batch replaced by PGD examples: 1 is Madry et al.'s training, 0.5 Goodfellow et al.'s even mix)."""
    from diffrobust.attacks.budget import check_threat

    unknown = sorted(set(settings) - set(ADVERSARIAL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown adversarial training keys {unknown}; known: {', '.join(ADVERSARIAL_DEFAULTS)}")
    settings = {**ADVERSARIAL_DEFAULTS, **settings}
    check_threat(settings["threat"])
    if not (settings["eps"] > 0 and settings["step_size"] > 0 and int(settings["steps"]) >= 1):
        raise ValueError(f"adversarial training needs eps > 0, step_size > 0 and steps >= 1, got {settings}")
    if not 0.0 <= settings["adversarial_fraction"] <= 1.0:
        raise ValueError(f"adversarial_fraction must lie in [0, 1], got {settings['adversarial_fraction']}")
    return {**settings, "eps": float(settings["eps"]), "step_size": float(settings["step_size"]),
            "steps": int(settings["steps"]), "random_start": bool(settings["random_start"]),
            "adversarial_fraction": float(settings["adversarial_fraction"])}


def _pgd(network, x01, labels, settings, generator):
    """`attacks.pgd.pgd` with the adversarial block's settings, the network in eval mode for the attack (batch norm
    uses its running statistics and does not update them, as the Madry lab's `robustness` library attacks), then
    put back in the mode it was in."""
    from diffrobust.attacks import pgd

    was_training = network.training
    network.eval()
    try:
        return pgd.pgd(network, x01, labels, threat=settings["threat"], eps=settings["eps"],
                       steps=settings["steps"], step_size=settings["step_size"],
                       random_start=settings["random_start"], generator=generator)
    finally:
        network.train(was_training)


def adversarial_batch(network, x01, labels, settings, generator):
    """The batch adversarial training trains on: its first round(adversarial_fraction·B) images (the batch order is
    already random) replaced by PGD examples against the current network, the rest kept clean. The random starts
    come from `generator`. Returns the images; the labels are unchanged."""
    count = round(settings["adversarial_fraction"] * len(labels))
    if count == 0:
        return x01
    x_adv = _pgd(network, x01[:count], labels[:count], settings, generator)
    return x_adv if count == len(labels) else torch.cat([x_adv, x01[count:]])


def pgd_accuracy(network, images_uint8, labels, settings, generator, batch_size=500):
    """Top-1 accuracy of a classifier on uint8 images under the adversarial block's PGD (the whole batch attacked,
    random starts from `generator`, drawn batch after batch); batches go to the network's device."""
    network.eval()
    device = module_device(network)
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = imagespace.uint8_to_float(torch.as_tensor(images_uint8[start:start + batch_size]).to(device))
        y = torch.as_tensor(labels[start:start + batch_size]).long().to(device)
        x_adv = _pgd(network, x, y, settings, generator)
        with torch.no_grad():
            correct += int((network(x_adv).argmax(dim=1) == y).sum())
    return correct / len(labels)


def train_classifier(dataset_dir, out_dir, *, architecture, epochs, batch_size, lr, seed, augment="shift",
                     max_shift=2, max_rotation_degrees=10.0, max_scale_change=0.1, weight_decay=5e-4,
                     warmup_fraction=0.05, checkpoint_every=200, log_every=20, device="cpu", adversarial=None,
                     on_step=None):
    """Train a classifier ([0, 1] images -> logits) on the train split with cross-entropy, SGD with Nesterov
    momentum, linear warmup and cosine decay; writes model.pt (kind "classifier"), metrics.json (train and test
    accuracy) and loss.tsv. epochs may be fractional (steps = ceil(epochs·N/B)). Returns the LoadedModel.

    architecture: a `small_resnet` block (or any classifier family); in_channels and num_classes are filled from
    the dataset. augment: "none", "shift" (random shifts of up to `max_shift` pixels; True means this) or
    "affine" (`random_affine`: rotation, scaling and shift). device: where the network and batches go (module
    docstring, "Device"); the accuracies in metrics.json are measured there too.
    adversarial: None (plain training) or a PGD block (`adversarial_settings`): every step's batch, after its
    augmentation, goes through `adversarial_batch` (PGD against the current network, random starts from the
    step's "attack" stream), and metrics.json adds the test accuracy under that PGD ("test_pgd_accuracy", random
    starts from the "evaluation" stream). The block is part of the job's identity; without it the identity, and
    every weight, is that of plain training.
    """
    augment = {True: "shift", False: "none", None: "none"}.get(augment, augment)
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if adversarial is not None:
        adversarial = adversarial_settings(**adversarial)
    device = prepare_device(device)
    dataset = load_dataset(dataset_dir)
    channels, _, num_classes = _dataset_shape(dataset)
    config_block = dict(architecture.get("config", {}))
    if architecture.get("family") == "small_resnet":
        config_block.setdefault("in_channels", channels)
        config_block.setdefault("num_classes", num_classes)
    architecture = {"family": architecture["family"], "config": config_block}
    # the affine limits are part of the job's identity only when they are used
    config_extra = ({"max_rotation_degrees": max_rotation_degrees, "max_scale_change": max_scale_change}
                    if augment == "affine" else {})
    train = dataset["train"]
    steps = math.ceil(epochs * len(train) / batch_size)
    config = {"job": "train_classifier", "dataset": _dataset_fingerprint(dataset_dir), "architecture": architecture,
              "epochs": epochs, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "augment": augment, "max_shift": max_shift, "weight_decay": weight_decay,
              "warmup_fraction": warmup_fraction, "log_every": log_every, **config_extra}
    if adversarial is not None:
        config["adversarial"] = adversarial
    torch.manual_seed(derived_seed(seed, 0, "init"))
    network = models.build_architecture(architecture).to(device)  # initialised on the CPU: the same on every device
    stream = BatchStream(train.images, train.labels, batch_size, seed, device)

    def loss_fn(step, generator):
        x01, labels = stream.batch(step)
        if augment == "shift":
            x01 = random_shift(x01, max_shift, generator)
        elif augment == "affine":
            x01 = random_affine(x01, max_shift, max_rotation_degrees, max_scale_change, generator)
        if adversarial is not None:
            x01 = adversarial_batch(network, x01, labels, adversarial, generator_for(seed, step, "attack"))
        return F.cross_entropy(network(x01), labels)

    result = run_training(out_dir, config=config, network=network, loss_fn=loss_fn, steps=steps,
                          lr_schedule=warmup_cosine(lr, round(warmup_fraction * steps), steps), seed=seed,
                          optimizer="sgd", weight_decay=weight_decay, checkpoint_every=checkpoint_every,
                          log_every=log_every, data_stream=stream, on_step=on_step,
                          description="classifier" if adversarial is None else "adversarial classifier")
    network = result.network
    test = dataset["test"]
    metrics = {"train_accuracy": accuracy(network, train.images, train.labels),
               "test_accuracy": accuracy(network, test.images, test.labels),
               "steps": steps, "seconds": round(result.seconds, 2)}
    if adversarial is not None:
        metrics["test_pgd_accuracy"] = pgd_accuracy(network, test.images, test.labels, adversarial,
                                                    generator_for(seed, 0, "evaluation"))
        metrics["pgd"] = adversarial
    weights_only_metrics = {key: value for key, value in metrics.items() if key != "seconds"}
    path = models.save_model(Path(out_dir) / MODEL_FILE, network, kind="classifier", architecture=architecture,
                             extra={"num_classes": num_classes, "class_names": dataset.meta.get("class_names"),
                                    "training": config, "metrics": weights_only_metrics})
    atomic_write_json(Path(out_dir) / METRICS_FILE, {**metrics, "device": describe_device(device, "fp32")})
    _finish_outputs(out_dir, result.loss_log)
    _remove_resume(out_dir)
    loaded = _with_run_facts(models.load_model(path), result.seconds, device)
    return dataclasses.replace(loaded, extra={**loaded.extra, "metrics": metrics})


def train_adversarial(dataset_dir, out_dir, *, threat="linf", eps=ADVERSARIAL_DEFAULTS["eps"],
                      step_size=ADVERSARIAL_DEFAULTS["step_size"], steps=ADVERSARIAL_DEFAULTS["steps"],
                      random_start=True, adversarial_fraction=1.0, **classifier_settings):
    """PGD adversarial training (Madry et al.): `train_classifier` with the adversarial block made of the PGD keys
    (threat, eps, step_size, steps = PGD steps per batch, random_start, adversarial_fraction); every other keyword
    is train_classifier's. The outputs are the classifier's (model.pt of kind "classifier", metrics.json with
    "test_pgd_accuracy" too, loss.tsv)."""
    block = {"threat": threat, "eps": eps, "step_size": step_size, "steps": steps, "random_start": random_start,
             "adversarial_fraction": adversarial_fraction}
    return train_classifier(dataset_dir, out_dir, adversarial=block, **classifier_settings)


# ---------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------

def image_shape(loaded):
    """(C, H, W) of the images a diffusion model works on."""
    network = loaded.network
    if models.family_of(loaded).edm:
        return network.img_channels, network.img_resolution, network.img_resolution
    return network.in_channels, network.image_size, network.image_size


@torch.no_grad()
def sample_class_conditional(loaded, classes, num_steps, guidance_scale=0.0, generator=None):
    """Deterministic DDIM samples (eta = 0, `num_steps` steps from time T) of the given classes -> [0, 1] images.

    guidance_scale w > 0 uses classifier-free guidance with the null class (w = 0: the plain conditional model).
    The starting noise comes from `generator` (drawn on its device, then moved); the samples are computed, and
    returned, on the device of the model's network.
    """
    model = models.eps_model(loaded, guidance_scale=guidance_scale)
    device = module_device(loaded.network)
    labels = torch.as_tensor(classes, dtype=torch.long).reshape(-1).to(device)
    noise = torch.randn((len(labels), *image_shape(loaded)), generator=generator,
                        device=generator_device(generator)).to(device)
    chain = loaded.diffusion
    x0 = ddim_reverse(model, chain, noise, chain.num_levels, num_steps, eta=0.0, y=labels)
    return imagespace.to_image_space(x0).clamp(0, 1)


def image_grid(images01, nrow):
    """[N, C, H, W] images in [0, 1] -> one uint8 H x W x C array, `nrow` images per row, 2-pixel gaps."""
    images = imagespace.float_to_uint8(images01)
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), dtype=np.uint8)
    for i in range(n):
        top, left = 2 + (i // nrow) * (h + 2), 2 + (i % nrow) * (w + 2)
        grid[top:top + h, left:left + w] = images[i].transpose(1, 2, 0)
    return grid


def save_image_grid(path, images01, nrow):
    """Write `image_grid(images01, nrow)` as a PNG, atomically."""
    from PIL import Image

    grid = image_grid(images01, nrow)
    with atomic_path(path) as temp:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(temp, format="PNG")
    return Path(path)
