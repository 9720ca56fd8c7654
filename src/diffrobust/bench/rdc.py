"""`diffrobust bench-rdc`: what the diffusion classifier (DC) and RDC cost per image, single-head against multi-head
(the paper's efficiency claim: one multi-head pass gives every class, so K x T network evaluations become T), at mini
and CIFAR-10 sizes.

The bench measures, on this machine, the seconds per image of one network evaluation (forward, and forward + input
gradient) of the class-conditional network and of the multi-head network, and multiplies them by the evaluations of a
DC forward (sigma points x classes single-head, sigma points multi-head) and of RDC (DC after 5 likelihood-maximization
steps, each a forward + gradient of the unconditional network). Networks have random weights. Sizes: `mini` (the mini
preset's ADM UNet, class-conditional with a null class, and the multi-head network made from it) and `cifar10`
(EDM's 55.7M-parameter class-conditional SongUNet; its multi-head counterpart differs only in the output convolution,
whose cost is negligible, so the same network is timed for it: said in the output).
"""

import torch

from diffrobust.bench import format_table, median_seconds
from diffrobust.config import load_checkpoint_registry, load_config
from diffrobust.models import build_architecture
from diffrobust.training import multihead_from_conditional

NUM_CLASSES = 10


def _mini_networks():
    models = load_config({"preset": "mini"})["models"]
    spec = {"family": models["diffusion"]["architecture"]["family"],
            "config": {**models["diffusion"]["architecture"]["config"], "in_channels": 1, "image_size": 32,
                       "class_cond": True, "num_classes": NUM_CLASSES + 1}}
    conditional = build_architecture(spec).eval()
    multihead, _ = multihead_from_conditional(conditional, NUM_CLASSES, fold_label=NUM_CLASSES)
    labels = torch.zeros(1, dtype=torch.long)

    def single(x):
        return conditional(x, torch.full((x.shape[0],), 99.0), y=labels.expand(x.shape[0]))

    def multi(x):
        return multihead.eval()(x, torch.full((x.shape[0],), 99.0))

    return single, multi, (1, 32, 32), sum(p.numel() for p in conditional.parameters()), False


def _cifar10_networks():
    network = build_architecture(load_checkpoint_registry()["edm_cifar10_cond_vp"]["architecture"]).eval()
    labels = torch.zeros(1, NUM_CLASSES)
    labels[0, 0] = 1

    def single(x):
        return network(x, torch.full((x.shape[0],), 0.5), labels.expand(x.shape[0], -1))

    return single, single, (3, 32, 32), sum(p.numel() for p in network.parameters()), True


SIZES = {"mini": _mini_networks, "cifar10": _cifar10_networks}


def per_image_seconds(call, image, batch_size, repeats):
    """(forward, forward + input gradient) seconds per image of `call` at `batch_size`."""
    x = torch.randn(batch_size, *image)

    def forward():
        with torch.no_grad():
            call(x)

    def forward_backward():
        x_var = x.clone().requires_grad_(True)
        call(x_var).sum().backward()

    forward()
    return (median_seconds(forward, repeats) / batch_size, median_seconds(forward_backward, repeats) / batch_size)


def dc_costs(size, points=(10, 125, 1000), lm_steps=5, batch_size=8, repeats=3):
    """Rows of (size, head, sigma points): network evaluations per image and estimated seconds of a DC forward, a DC
    gradient and an RDC forward."""
    torch.manual_seed(0)
    single, multi, image, parameters, multi_assumed = SIZES[size]()
    timed = {"single": per_image_seconds(single, image, batch_size, repeats)}
    timed["multi"] = timed["single"] if multi_assumed else per_image_seconds(multi, image, batch_size, repeats)
    rows = []
    for count in points:
        for head in ("single", "multi"):
            forward, gradient = timed[head]
            evaluations = count * (NUM_CLASSES if head == "single" else 1)
            lm = lm_steps * timed["single"][1]  # LM: forward + gradient of the (unconditional) network per step
            rows.append({"size": size, "head": head, "points": count, "network_evaluations": evaluations,
                         "dc_forward_s": evaluations * forward, "dc_gradient_s": evaluations * gradient,
                         "rdc_forward_s": evaluations * forward + lm, "parameters": parameters,
                         "multi_head_timed_as_single": multi_assumed and head == "multi"})
    return rows


def format_rows(rows):
    by_key = {(r["size"], r["points"], r["head"]): r for r in rows}

    def ratio(r):
        if r["head"] != "multi":
            return ""
        return f"{by_key[(r['size'], r['points'], 'single')]['dc_forward_s'] / r['dc_forward_s']:.1f}x"

    columns = (("size", "<8", lambda r: r["size"]), ("head", "<6", lambda r: r["head"]),
               ("points", ">6", lambda r: r["points"]), ("net evals", ">9", lambda r: f"{r['network_evaluations']:,d}"),
               ("DC fwd s", ">9", lambda r: f"{r['dc_forward_s']:.2f}"),
               ("DC grad s", ">10", lambda r: f"{r['dc_gradient_s']:.2f}"),
               ("RDC fwd s", ">10", lambda r: f"{r['rdc_forward_s']:.2f}"), ("single/multi", ">12", ratio))
    lines = [format_table(columns, rows)]
    for size in dict.fromkeys(r["size"] for r in rows):
        first = next(r for r in rows if r["size"] == size)
        note = " (multi-head timed as the single-head network: only its output convolution differs)" if any(
            r["multi_head_timed_as_single"] for r in rows if r["size"] == size) else ""
        lines.append(f"{size}: conditional network {first['parameters'] / 1e6:.2f}M parameters{note}")
    return "\n".join(lines)


def add_arguments(parser):
    from diffrobust.argtypes import choice_list, positive_int, positive_int_list

    parser.add_argument("--sizes", type=choice_list(list(SIZES)), default="mini,cifar10",
                        help="comma-separated: mini, cifar10")
    parser.add_argument("--points", type=positive_int_list, default="10,125,1000",
                        help="sigma points of the DC, comma-separated (RDC: 1000; its demos 125)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=3)
    return parser


def run(args):
    rows = [row for size in args.sizes for row in dc_costs(size, args.points, batch_size=args.batch_size,
                                                           repeats=args.repeats)]
    print(format_rows(rows))
    return rows
