"""`diffrobust bench-certify`: noisy samples per second through denoise + classify (the inner loop of DDS and
DensePure certification), and the share of time spent in the diffusion network and in the classifier.

Networks have random weights: speed does not depend on them. Two sizes: `mini` (this preset's small ADM UNet and
small ResNet on 1x32x32 images) and `cifar10` (the 52.5M-parameter improved-diffusion UNet on 3x32x32 with the
papers' 85.8M-parameter ViT-B/16, which classifies the image resized to 224 px).

`--device cuda --precision fp32|tf32|fp16|bf16` times the same pipeline on a GPU (`diffrobust gpu-check` checks the
labels against fp32 first); `--compile default|max-autotune|reduce-overhead` runs both networks through
`torch.compile` (reduce-overhead: with CUDA graphs, GPU only). Every timing follows one untimed warm-up call
(compilation, kernel caches). Each one-shot row also gives the seconds one image's DDS certification takes at
N = 100,000 (+ N0 = 100 selection draws), the paper-scale figure (Carlini et al.: ~121 s on an A100).
"""

import torch

from diffrobust import diffusion as dp
from diffrobust.bench import interleaved_median_seconds, median_seconds
from diffrobust.config import load_checkpoint_registry, load_config
from diffrobust.defenses import SmoothingDenoiser
from diffrobust.device import COMPILE_MODES, OnDevice, matmul_tf32, resolve_device, synchronize
from diffrobust.models import build_architecture


def _mini_size():
    """The mini preset's networks as configured (config/presets/mini.yaml), on 1x32x32 MNIST with 10 classes."""
    models = load_config({"preset": "mini"})["models"]
    diffusion = {**models["diffusion"]["architecture"]["config"], "in_channels": 1, "image_size": 32,
                 "class_cond": True, "num_classes": 11}
    classifier = {**models["classifier"]["architecture"]["config"], "in_channels": 1, "num_classes": 10}
    return {
        "diffusion": {"family": models["diffusion"]["architecture"]["family"], "config": diffusion},
        "classifier": {"family": models["classifier"]["architecture"]["family"], "config": classifier},
        "image": (1, 32, 32),
        "schedule": (models["diffusion"]["schedule"], models["diffusion"]["num_timesteps"]),
        "variance": models["diffusion"]["variance"],
        "null_class": 10,
    }


SIZES = {
    "mini": _mini_size,
    "cifar10": lambda: {
        "diffusion": "improved_diffusion_cifar10_uncond",
        "classifier": "vit_b16_cifar10",
        "image": (3, 32, 32),
        "schedule": ("cosine", 4000),
        "variance": "learned_range",
        "null_class": None,
    },
}


def _network(spec):
    if isinstance(spec, str):
        spec = load_checkpoint_registry()[spec]["architecture"]
    return build_architecture(spec).eval().requires_grad_(False)


class _Eps(torch.nn.Module):
    """eps(x, t) of a random-weight UNet: unconditional, or the null class of a conditional one."""

    def __init__(self, network, null_class):
        super().__init__()
        self.network, self.null_class = network, null_class

    def forward(self, x, t, y=None):
        if self.null_class is None:
            return self.network(x, t)
        return self.network(x, t, y=torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device))



def build_pipeline(size, sigma=0.5, reverse="one_shot", num_steps=None, device="cpu", precisions=None,
                   compile="none"):
    """(denoiser, classifier, image shape) of a size's networks (random weights, seeded), run on `device` at
    `precisions` ({"diffusion": ..., "classifier": ...}), `torch.compile`d with mode `compile` unless "none"; the
    same seed builds the same weights on every device."""
    precisions = precisions or {}
    spec = SIZES[size]()
    torch.manual_seed(0)
    unet, classifier = _network(spec["diffusion"]), _network(spec["classifier"])
    unet = OnDevice(unet, device, precisions.get("diffusion", "fp32"), compile)
    classifier = OnDevice(classifier, device, precisions.get("classifier", "fp32"), compile)
    name, steps = spec["schedule"]
    maker = dp.GaussianDiffusion.cosine if name == "cosine" else dp.GaussianDiffusion.linear
    schedule = maker(steps, variance=spec["variance"], rescale_timesteps=name == "cosine")
    rule = "cosine_closed_form" if name == "cosine" else "nearest"
    denoiser = SmoothingDenoiser(_Eps(unet, spec["null_class"]), schedule, sigma, tstar_rule=rule, reverse=reverse,
                                 num_steps=num_steps)
    return denoiser, classifier, spec["image"]


# DDS certification of one image at paper scale: N0 selection draws, then N estimation draws (Carlini et al.)
PAPER_N0, PAPER_N = 100, 100_000
# --precision: the networks' precision and whether float32 matrix products may use TF32 on a GPU
PRECISIONS = {"fp32": ("fp32", False), "tf32": ("fp32", True), "fp16": ("fp16", False), "bf16": ("bf16", False)}


def _synchronized(call, device):
    def run():
        out = call()
        synchronize(device)
        return out
    return run


@torch.no_grad()
def measure(size, batch_size=32, sigma=0.5, reverse="one_shot", num_steps=None, repeats=3, device="cpu",
            precisions=None, compile="none"):
    """Median seconds of one batch through the denoiser, the classifier and both; samples/s and time shares."""
    denoiser, classifier, image = build_pipeline(size, sigma, reverse, num_steps, device, precisions, compile)
    noisy = torch.rand(batch_size, *image).to(device)
    generator = torch.Generator().manual_seed(0)

    def seconds(call):
        return median_seconds(_synchronized(call, device), repeats, warmup=1)

    denoise = seconds(lambda: denoiser(noisy, generator))
    cleaned = denoiser(noisy, generator)
    classify = seconds(lambda: classifier(cleaned))
    total = seconds(lambda: classifier(denoiser(noisy, generator)))
    unet = denoiser.eps_model.network
    return {"size": size, "reverse": reverse, "compile": compile, "steps": denoiser.network_evaluations(),
            "batch_size": batch_size,
            "samples_per_second": batch_size / total, "diffusion_share": denoise / (denoise + classify),
            "classifier_share": classify / (denoise + classify), "seconds_per_batch": total,
            "seconds_per_paper_image": (PAPER_N0 + PAPER_N) * total / batch_size if reverse == "one_shot" else None,
            "diffusion_parameters": sum(p.numel() for p in unet.parameters()),
            "classifier_parameters": sum(p.numel() for p in classifier.parameters())}


@torch.no_grad()
def measure_votes(size, votes=10, num_steps=2, batch_size=4, sigma=0.5, repeats=3, device="cpu", precisions=None,
                  compile="none"):
    """DensePure's K-vote labeler two ways in one run: the K reverse runs branched after their shared first network
    call (`SmoothingDenoiser.purify_votes`) against the per-vote loop, with the same streams. Returns the median
    seconds of each, their ratio, the network-call ratio K·S / (1 + K(S - 1)) and whether the labels agree."""
    from diffrobust.defenses import VotingLabeler

    denoiser, classifier, image = build_pipeline(size, sigma, "respaced", num_steps, device, precisions, compile)
    noisy = torch.rand(batch_size, *image, generator=torch.Generator().manual_seed(1)).to(device)
    together = VotingLabeler(denoiser, classifier, votes)
    loop = VotingLabeler(lambda x, generator: denoiser(x, generator), classifier, votes)  # no purify_votes

    def labels(labeler):
        return labeler(noisy, torch.Generator().manual_seed(0))

    # interleaved rounds (one call of each per round, after a warm-up of each): a change of load hits both alike
    branched, per_vote = interleaved_median_seconds(
        [_synchronized(lambda: labels(together), device), _synchronized(lambda: labels(loop), device)], repeats)
    calls = votes * denoiser.network_evaluations()
    return {"size": size, "votes": votes, "steps": denoiser.network_evaluations(), "batch_size": batch_size,
            "per_vote_seconds": per_vote, "branched_seconds": branched, "speedup": per_vote / branched,
            "call_ratio": calls / denoiser.network_evaluations_of_votes(votes),
            "labels_agree": bool(torch.equal(labels(together), labels(loop)))}


VOTE_COLUMNS = (  # bench.format_table's (title, spec, text) of format_vote_rows
    ("size", "<8", lambda r: r["size"]),
    ("K", ">3", lambda r: r["votes"]),
    ("S", ">2", lambda r: r["steps"]),
    ("batch", ">5", lambda r: r["batch_size"]),
    ("per-vote s", ">10", lambda r: f"{r['per_vote_seconds']:.3f}"),
    ("branched s", ">10", lambda r: f"{r['branched_seconds']:.3f}"),
    ("speedup", ">7", lambda r: f"{r['speedup']:.2f}x"),
    ("call ratio", ">10", lambda r: f"{r['call_ratio']:.2f}x"),
    ("labels", ">7", lambda r: "same" if r["labels_agree"] else "DIFFER"),
)

COLUMNS = (  # bench.format_table's (title, spec, text) of format_rows
    ("size", "<8", lambda r: r["size"]),
    ("reverse", "<9", lambda r: r["reverse"]),
    ("net evals", ">9", lambda r: r["steps"]),
    ("batch", ">5", lambda r: r["batch_size"]),
    ("samples/s", ">10", lambda r: f"{r['samples_per_second']:.1f}"),
    ("diffusion", ">9", lambda r: f"{r['diffusion_share']:.0%}"),
    ("classifier", ">10", lambda r: f"{r['classifier_share']:.0%}"),
    ("params (diff / clf)", ">22",
     lambda r: f"{r['diffusion_parameters'] / 1e6:.2f}M / {r['classifier_parameters'] / 1e6:.2f}M"),
    ("s/image at N=1e5", ">17",
     lambda r: "" if r.get("seconds_per_paper_image") is None else f"{r['seconds_per_paper_image']:,.0f}"),
)


def format_vote_rows(rows):
    from diffrobust.bench import format_table

    return format_table(VOTE_COLUMNS, rows)


def format_rows(rows):
    from diffrobust.bench import format_table

    return format_table(COLUMNS, rows)


def add_arguments(parser):
    parser.add_argument("--sizes", default="mini,cifar10", help="comma-separated: mini, cifar10")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--densepure-steps", type=int, default=2, help="S of the DensePure (respaced) row")
    parser.add_argument("--votes", type=int, default=10, help="K of the vote comparison (0: skip it)")
    parser.add_argument("--votes-batch-size", type=int, default=4, help="noisy images per vote-comparison batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="both networks' precision; tf32: float32 with TF32 matrix products (CUDA only)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                        help="torch.compile both networks with this mode (reduce-overhead: CUDA graphs, GPU only)")
    return parser


def run(args):
    device = resolve_device(args.device, key="--device")
    precision, tf32 = PRECISIONS[args.precision]
    precisions = {"diffusion": precision, "classifier": precision}
    print(f"device {device}, precision {args.precision}, compile {args.compile}")
    rows = []
    with matmul_tf32(tf32):
        for size in args.sizes.split(","):
            rows.append(measure(size, args.batch_size, args.sigma, "one_shot", None, args.repeats, device,
                                precisions, args.compile))
            rows.append(measure(size, args.batch_size, args.sigma, "respaced", args.densepure_steps, args.repeats,
                                device, precisions, args.compile))
    print(format_rows(rows))
    if args.votes:
        with matmul_tf32(tf32):
            vote_rows = [measure_votes(size, args.votes, args.densepure_steps, args.votes_batch_size, args.sigma,
                                       args.repeats, device, precisions, args.compile)
                         for size in args.sizes.split(",")]
        print("\nDensePure's K votes: branched after the shared first call vs one reverse run per vote")
        print(format_vote_rows(vote_rows))
        rows += vote_rows
    return rows
