"""`diffrobust gpu-check`: does this GPU give the CPU's answers, and how fast? (a few minutes on one GPU)

1. **Certification slice** (mini networks, random weights seeded the same on both devices): the per-draw labels of
   DDS (one-shot) and DensePure (S = 2, K = 3 votes) for the same noisy images and seeds, on the CPU and on the GPU:
   the fraction of labels that agree, the largest difference of the networks' outputs, samples/s of each.
2. **Paper-size networks** (the 52.5M improved-diffusion CIFAR-10 UNet and the 85.8M ViT-B/16 at 224 px): DDS
   samples/s on the GPU for each variant (`--variants`; default TF32, fp16 and bf16 autocast, and TF32 and bf16
   through `torch.compile` with CUDA graphs, "+reduce-overhead"); label agreement and the largest logit difference
   of each against GPU fp32 eager, and of GPU fp32 against the CPU on one batch.

A variant is a precision of `bench.certify.PRECISIONS` (fp32, tf32, fp16, bf16), optionally followed by
"+<torch.compile mode>" (`device.COMPILE_MODES`: default, max-autotune, reduce-overhead). The compilation is not
timed: the first batch (whose logits are compared) compiles the one-shot rows' only batch shape before the timed draws.

Randomness comes from CPU generators on both devices (`device` module docstring), so every difference measured here
is arithmetic: kernel order, TF32 and reduced-precision rounding. On a machine without a CUDA GPU it says so and
exits with status 1.
"""

import time

import numpy as np
import torch

from diffrobust.bench import certify as bench_certify
from diffrobust.bench import format_table
from diffrobust.certify import sample_noise_labels
from diffrobust.defenses import VotingLabeler
from diffrobust.device import COMPILE_MODES, DeviceError, cuda_available, matmul_tf32, synchronize

SLICE = {"images": 4, "draws": 32, "sigma": 0.5, "votes": 3, "num_steps": 2}
PAPER_VARIANTS = ("tf32", "fp16", "bf16", "tf32+reduce-overhead", "bf16+reduce-overhead")


def variant_settings(name):
    """"bf16+reduce-overhead" -> ("bf16", TF32 off, "reduce-overhead"); "tf32" -> ("fp32", TF32 on, "none")."""
    precision_name, plus, compile = name.partition("+")
    if precision_name not in bench_certify.PRECISIONS or (plus and compile not in COMPILE_MODES):
        raise DeviceError(f"variant {name!r}: a precision ({', '.join(bench_certify.PRECISIONS)}), optionally "
                          f"'+' a torch.compile mode ({', '.join(COMPILE_MODES)})")
    precision, tf32 = bench_certify.PRECISIONS[precision_name]
    return precision, tf32, compile or "none"


def _labels(size, reverse, num_steps, votes, device, variant, images, draws, sigma, batch_size):
    """(labels (K, images * draws), logits of the first batch, seconds) of one pipeline on one device."""
    precision, tf32, compile = variant_settings(variant)
    with matmul_tf32(tf32):
        denoiser, classifier, shape = bench_certify.build_pipeline(
            size, sigma, reverse, num_steps, device, {"diffusion": precision, "classifier": precision}, compile)
        labeler = VotingLabeler(denoiser, classifier, votes)
        clean = torch.rand((images, *shape), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            first = clean[:1] + sigma * torch.randn((min(batch_size, draws), *shape),
                                                    generator=torch.Generator().manual_seed(2)).to(device)
            logits = classifier(denoiser(first, torch.Generator().manual_seed(3))).cpu()
            started = time.perf_counter()
            labels = [sample_noise_labels(labeler, image, draws, sigma, batch_size,
                                          torch.Generator().manual_seed(10 + i), torch.Generator().manual_seed(20 + i))
                      for i, image in enumerate(clean)]
            synchronize(device)
            seconds = time.perf_counter() - started
        return np.concatenate(labels, axis=1), logits, seconds


def compare(size, reverse, num_steps, votes, reference, candidate, *, images, draws, sigma, batch_size):
    """Agreement of a candidate (device, variant) with a reference (device, variant): a result row."""
    rows = {}
    for role, (device, variant) in (("reference", reference), ("candidate", candidate)):
        rows[role] = _labels(size, reverse, num_steps, votes, device, variant, images, draws, sigma, batch_size)
    (ref_labels, ref_logits, ref_seconds), (labels, logits, seconds) = rows["reference"], rows["candidate"]
    samples = images * draws
    paper_draws = bench_certify.PAPER_N0 + bench_certify.PAPER_N
    return {"size": size, "reverse": reverse, "votes": votes, "reference": "/".join(reference),
            "candidate": "/".join(candidate), "label_agreement": float(np.mean(ref_labels == labels)),
            "max_logit_difference": float((ref_logits - logits).abs().max()),
            "reference_samples_per_s": samples / ref_seconds, "candidate_samples_per_s": samples / seconds,
            # DDS at paper scale: N0 + N draws of one image at the candidate's rate (the goal: <= 15 s on an H100)
            "candidate_seconds_per_paper_image": paper_draws * seconds / samples if reverse == "one_shot" else None}


COLUMNS = (  # format_table's (title, spec, text) of format_rows
    ("size", "<8", lambda r: r["size"]),
    ("reverse", "<9", lambda r: r["reverse"]),
    ("K", ">2", lambda r: r["votes"]),
    ("reference", ">10", lambda r: r["reference"]),
    ("candidate", ">25", lambda r: r["candidate"]),
    ("agree", ">7", lambda r: f"{r['label_agreement']:.2%}"),
    ("max |dlogit|", ">12", lambda r: f"{r['max_logit_difference']:.2e}"),
    ("ref/s", ">8", lambda r: f"{r['reference_samples_per_s']:.1f}"),
    ("cand/s", ">8", lambda r: f"{r['candidate_samples_per_s']:.1f}"),
    ("s/image N=1e5", ">13", lambda r: "" if r["candidate_seconds_per_paper_image"] is None
     else f"{r['candidate_seconds_per_paper_image']:,.1f}"),
)


def format_rows(rows):
    return format_table(COLUMNS, rows)


def run_checks(device="cuda", reference_device="cpu", paper_batch=32, paper_draws=None, variants=PAPER_VARIANTS):
    """Every comparison of the module docstring, as rows. The paper-size variants certify 2 images with
    `paper_draws` draws each (default: two full batches, so no smaller last batch is compiled while timed)."""
    paper_draws = paper_draws or max(64, 2 * paper_batch)
    s = SLICE
    common = {"images": s["images"], "draws": s["draws"], "sigma": s["sigma"], "batch_size": s["draws"]}
    rows = [compare("mini", "one_shot", None, 1, (reference_device, "fp32"), (device, "fp32"), **common),
            compare("mini", "respaced", s["num_steps"], s["votes"], (reference_device, "fp32"), (device, "fp32"),
                    **common)]
    # paper size: one batch on the CPU is enough to see the arithmetic difference; the variants against GPU fp32
    rows.append(compare("cifar10", "one_shot", None, 1, (reference_device, "fp32"), (device, "fp32"), images=1,
                        draws=8, sigma=s["sigma"], batch_size=8))
    for variant in variants:
        rows.append(compare("cifar10", "one_shot", None, 1, (device, "fp32"), (device, variant), images=2,
                            draws=paper_draws, sigma=s["sigma"], batch_size=paper_batch))
    return rows


def add_arguments(parser):
    parser.add_argument("--device", default="cuda", help="the GPU to check (cuda or cuda:N)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the paper-size rows")
    parser.add_argument("--variants", default=",".join(PAPER_VARIANTS),
                        help="comma-separated paper-size variants checked against GPU fp32 eager: a precision "
                             "(fp32, tf32, fp16, bf16), optionally +default, +max-autotune or +reduce-overhead")
    return parser


def run(args):
    if not cuda_available():
        raise DeviceError(f"no CUDA GPU here: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none, "
                          "so there is nothing to check. Run `diffrobust gpu-check` on a machine with an NVIDIA GPU.")
    variants = [name for name in args.variants.split(",") if name]
    for name in variants:
        variant_settings(name)  # a misspelt variant fails before minutes of GPU work
    print(f"GPU: {torch.cuda.get_device_name(args.device)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    rows = run_checks(args.device, paper_batch=args.batch_size, variants=variants)
    print(format_rows(rows))
    return rows
