"""`diffrobust bench-attack`: what an adaptive attack on DiffPure costs per image, for the `full` and `bpda` gradient
modes, at mini and CIFAR-10 sizes.

One gradient evaluation of the defense is one purification (forward; for `full` also backward through every
step) plus the classifier's forward and backward. The bench measures, on this machine and at the given batch size,
the seconds per image of one diffusion-network call forward and forward + backward, and of the classifier forward +
backward (medians of a few repeats), and multiplies them by the counts of each configured attack: gradient
evaluations per image (an upper bound: every iteration on every image, as when no image breaks early), network
passes, and seconds. Networks have random weights (speed does not depend on them). Sizes: `mini` (the mini preset's
ADM UNet and small ResNet, its DiffPure settings) and `cifar10` (score_sde NCSN++ `cifar10_ddpmpp_deep_continuous`,
106.6M parameters, with RobustBench's WRN-28-10, DiffPure's CIFAR-10 protocol).
"""

import torch

from diffrobust import diffusion as dp
from diffrobust.bench import format_table, median_seconds
from diffrobust.config import load_checkpoint_registry, load_config
from diffrobust.models import build_architecture


def _mini_networks():
    models = load_config({"preset": "mini"})["models"]
    unet = {**models["diffusion"]["architecture"]["config"], "in_channels": 1, "image_size": 32}
    classifier = {**models["classifier"]["architecture"]["config"], "in_channels": 1, "num_classes": 10}
    return ({"family": models["diffusion"]["architecture"]["family"], "config": unet},
            {"family": models["classifier"]["architecture"]["family"], "config": classifier}, (1, 32, 32))


def _cifar10_networks():
    registry = load_checkpoint_registry()
    return (registry["score_sde_cifar10_vp_ddpmpp_deep"]["architecture"],
            registry["robustbench_cifar10_standard_wrn28_10"]["architecture"], (3, 32, 32))


SIZES = {"mini": ("mini", _mini_networks), "cifar10": ("cifar10", _cifar10_networks)}


def gradient_evaluations(plan, num_classes=10):
    """Upper bound on gradient evaluations per image of one attack (no early breaks): APGD restarts cost
    (n_iter + 1)·eot_iter each (AutoAttack's counting), FAB-T n_iter per target, Square none; eot_pgd
    steps·eot_attack_reps."""
    if plan["method"] == "eot_pgd":
        return plan["steps"] * plan["eot_attack_reps"]
    version = plan["version"]
    n_iter = plan.get("n_iter") or 100
    targets = min(plan.get("n_target_classes") or 9, num_classes - 1)
    if version == "standard":
        eot = plan.get("eot_iter") or 1
        return (n_iter + 1) * eot * (plan.get("n_restarts") or 1) + targets * (n_iter + 1) * eot + targets * n_iter
    if version == "rand":
        return 2 * (n_iter + 1) * (plan.get("eot_iter") or 20) * (plan.get("n_restarts") or 1)
    per = {"apgd-ce": (n_iter + 1) * (plan.get("eot_iter") or 1) * (plan.get("n_restarts") or 5),
           "apgd-t": targets * (n_iter + 1) * (plan.get("eot_iter") or 1), "fab": 5 * n_iter,
           "fab-t": targets * n_iter, "square": 0}
    per["apgd-dlr"] = per["apgd-ce"]
    return sum(per[name] for name in plan["attacks"])


def forward_evaluations(plan):
    """Forwards per image that carry no gradient (eot_pgd's verification, Square's queries), an upper bound."""
    if plan["method"] == "eot_pgd":
        return (plan["steps"] + 1) * (plan["eot_attack_reps"] + plan["eot_defense_reps"])
    if plan.get("version") == "standard":
        return plan.get("n_queries") or 5000
    return 0


def measure_calls(unet_spec, classifier_spec, image, batch_size, repeats):
    """Seconds per image: diffusion network forward, forward + backward (input gradient), classifier forward +
    backward."""
    torch.manual_seed(0)
    unet = build_architecture(unet_spec).eval().requires_grad_(False)
    classifier = build_architecture(classifier_spec).eval().requires_grad_(False)
    x = torch.randn(batch_size, *image)
    t = torch.full((batch_size,), 99.0)

    def forward():
        with torch.no_grad():
            unet(x, t)

    def forward_backward(network, *inputs):
        x_var = x.clone().requires_grad_(True)
        network(x_var, *inputs).sum().backward()

    forward()
    return {"unet_forward": median_seconds(forward, repeats) / batch_size,
            "unet_forward_backward": median_seconds(lambda: forward_backward(unet, t), repeats) / batch_size,
            "classifier_forward_backward": median_seconds(lambda: forward_backward(classifier), repeats) / batch_size,
            "unet_parameters": sum(p.numel() for p in unet.parameters())}


def attack_costs(size, batch_size=8, repeats=3, threat="linf"):
    """Rows of (size, attack, gradient mode): gradient evaluations, network passes and estimated seconds per image."""
    preset, networks = SIZES[size]
    settings = load_config({"preset": preset})["diffpure"]
    unet_spec, classifier_spec, image = networks()
    calls = measure_calls(unet_spec, classifier_spec, image, batch_size, repeats)
    purifier = settings["purifier"]
    t_star = settings["threats"][threat]["t_star"]
    steps = dp.vpsde_num_steps(t_star, purifier["dt"]) if purifier["variant"] == "sde" else round(t_star * dp.VPSDE_N)
    rows = []
    for attack, plan in settings["attacks"].items():
        gradients, forwards = gradient_evaluations(plan), forward_evaluations(plan)
        for mode in ("full", "bpda"):
            unet_per_gradient = calls["unet_forward_backward" if mode == "full" else "unet_forward"]
            seconds = (gradients * (steps * unet_per_gradient + calls["classifier_forward_backward"])
                       + forwards * steps * calls["unet_forward"])
            rows.append({"size": size, "attack": attack, "mode": mode, "threat": threat, "steps": steps,
                         "gradient_evaluations": gradients, "forwards": forwards,
                         "network_passes": (gradients + forwards) * (steps + 1), "seconds_per_image": seconds,
                         "unet_parameters": calls["unet_parameters"], **calls})
    return rows


COLUMNS = (  # format_table's (title, spec, text) of format_rows
    ("size", "<8", lambda r: r["size"]),
    ("attack", "<9", lambda r: r["attack"]),
    ("mode", "<5", lambda r: r["mode"]),
    ("steps", ">5", lambda r: r["steps"]),
    ("grad evals", ">10", lambda r: r["gradient_evaluations"]),
    ("forwards", ">8", lambda r: r["forwards"]),
    ("net passes", ">11", lambda r: f"{r['network_passes']:,d}"),
    ("s/image", ">10", lambda r: f"{r['seconds_per_image']:.1f}"),
)


def format_rows(rows):
    lines = [format_table(COLUMNS, rows)]
    sizes = {r["size"]: r for r in rows}
    for size, r in sizes.items():
        lines.append(f"{size}: diffusion network {r['unet_parameters'] / 1e6:.2f}M parameters, per image "
                     f"{r['unet_forward'] * 1e3:.1f} ms forward, {r['unet_forward_backward'] * 1e3:.1f} ms forward + "
                     f"backward; classifier forward + backward {r['classifier_forward_backward'] * 1e3:.1f} ms")
    return "\n".join(lines)


def add_arguments(parser):
    from diffrobust.argtypes import choice_list, positive_int

    parser.add_argument("--sizes", type=choice_list(list(SIZES)), default="mini,cifar10",
                        help="comma-separated: mini, cifar10")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threat", default="linf", choices=["linf", "l2"])
    return parser


def run(args):
    rows = [row for size in args.sizes for row in attack_costs(size, args.batch_size, args.repeats, args.threat)]
    print(format_rows(rows))
    return rows
