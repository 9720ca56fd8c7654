"""`diffrobust bench`: the FLOP count against hand counts, the variants' outputs, and the report's arithmetic.

No assertion here is about speed: timings on a shared CPU vary; what must hold is that every derived number
(images/s, GFLOP/s, fraction of peak, speed-up, fastest variant) follows from the report's own timings.
"""

import argparse
import csv
import json
import math

import pytest
import torch
from torch import nn

from diffrobust.bench import networks as bench
from diffrobust.config import ConfigError
from diffrobust.networks import build_network
from diffrobust.networks.adm import AttentionBlock

QUICK = bench.QUICK_ARCHITECTURE
# The variants cheap enough for tests (compile is exercised through its failure path only).
EAGER_VARIANTS = ("float32", "inference_mode", "channels_last", "bfloat16_autocast")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on a busy shared CPU two OpenMP threads make these tiny networks ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomised(network, seed=0):
    """The network with every parameter random: ADM zero-initialises its output layers, which would make every
    variant's output identically zero and their comparison vacuous."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return network.eval()


# ---------------------------------------------------------------------------------------------------------------
# FLOP counting


class TinyAttentionNet(nn.Module):
    """A strided grouped convolution, a kernel-1 Conv1d producing q, k, v, two einsum products and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.qkv = nn.Conv1d(8, 12, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = self.grouped(self.conv(x)).flatten(2)  # [N, 8, 9]
        q, k, v = self.qkv(h).split(4, dim=1)  # each [N, 4, 9]
        weight = torch.einsum("bct,bcs->bts", q, k).softmax(-1)
        attended = torch.einsum("bts,bcs->bct", weight, v)
        return self.head(attended.mean(-1))


def test_flop_count_matches_a_hand_count_on_a_tiny_network():
    x = torch.randn(2, 3, 5, 6)
    # 2 FLOPs per multiply-add; batch 2.
    conv = 2 * 2 * (8 * 5 * 6) * (3 * 3 * 3)  # outputs x (in channels x kernel)       = 25,920
    grouped = 2 * 2 * (8 * 3 * 3) * (2 * 3 * 3)  # 5x6 -> 3x3, 8/4 = 2 inputs per group  = 5,184
    qkv = 2 * 2 * (12 * 9) * 8  # kernel-1 Conv1d over 9 positions                    = 3,456
    scores = 2 * 2 * (9 * 9) * 4  # q^T k: 9x9 scores, 4 channels each                  = 1,296
    mixing = 2 * 2 * (4 * 9) * 9  # weights x v                                          = 1,296
    head = 2 * 2 * 5 * 4  # linear 4 -> 5, bias not counted                             = 80
    assert bench.count_flops(TinyAttentionNet(), x) == conv + grouped + qkv + scores + mixing + head == 37_232


def layer_by_layer_flops(network, args):
    """Independent count by forward hooks: Conv1d/Conv2d and Linear from their shapes, plus per attention block its
    qkv and proj_out layers and the two attention products (each 2 * N * C * T^2 FLOPs for C channels over all heads
    at T positions)."""
    total = 0

    def count_conv(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def count_linear(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.in_features

    def count_attention(module, inputs, output):
        nonlocal total
        batch, channels, *spatial = inputs[0].shape
        positions = math.prod(spatial)
        total += 2 * (2 * batch * channels * positions ** 2)
        # qkv and proj_out: kernel-1 Conv1d modules that the block applies as matrix products over its positions
        for layer in (module.qkv, module.proj_out):
            total += 2 * batch * positions * layer.out_channels * layer.in_channels

    attention_layers = {id(layer) for module in network.modules() if isinstance(module, AttentionBlock)
                        for layer in (module.qkv, module.proj_out)}
    hooks = []
    for module in network.modules():
        if id(module) in attention_layers:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            hooks.append(module.register_forward_hook(count_conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(count_linear))
        elif isinstance(module, AttentionBlock):
            hooks.append(module.register_forward_hook(count_attention))
    with torch.no_grad():
        network(*args)
    for hook in hooks:
        hook.remove()
    return total


def test_flops_per_image_of_the_mini_adm_match_the_layer_by_layer_count():
    network = build_network(QUICK).eval()
    per_image = bench.flops_per_image(network, QUICK)
    assert per_image * 3 == layer_by_layer_flops(network, bench.example_inputs(network, QUICK, 3))
    assert per_image == bench.count_flops(network, *bench.example_inputs(network, QUICK, 1))


def test_flops_of_the_full_cifar10_network_match_the_layer_by_layer_count():
    # On the meta device: shapes only, no memory, no arithmetic, so the 52.5M-parameter network costs nothing.
    _, architecture = bench.resolve_network(bench.DEFAULT_NETWORK)
    with torch.device("meta"):
        network = build_network(architecture).eval()
        args = bench.example_inputs(network, architecture, 1)
    assert sum(p.numel() for p in network.parameters()) == 52_546_438
    flops = bench.count_flops(network, *args)
    assert flops == layer_by_layer_flops(network, args)
    assert flops == 16_773_414_912  # 8.39 G multiply-adds per 32x32 image


def test_matmul_probe_converts_its_best_time_to_gflops():
    probe = bench.MatmulProbe(64)
    probe.best_seconds = 1e-3
    assert probe.best_gflops == pytest.approx(2 * 64**3 / 1e-3 / 1e9)
    assert 0 < bench.matmul_gflops(64, repeats=2) < math.inf


# ---------------------------------------------------------------------------------------------------------------
# Variants


@pytest.mark.parametrize("variant, tolerance", [
    ("float32", 0), ("inference_mode", 0), ("channels_last", 1e-5), ("bfloat16_autocast", 5e-2),
    ("channels_last+bfloat16_autocast+inference_mode", 5e-2), ("official_steps", 1e-5), ("tf32", 0),
])
def test_variants_compute_the_float32_function(variant, tolerance):
    network = randomised(build_network(QUICK))
    args = bench.example_inputs(network, QUICK, 2)
    with torch.no_grad():
        reference = network(*args)
    output = bench.apply_variant(randomised(build_network(QUICK)), variant)(*args)
    assert output.dtype == torch.float32 and output.shape == reference.shape == (2, 6, 32, 32)
    assert reference.abs().mean() > 0.01  # a real signal, not zero-initialised layers
    error = (output - reference).abs().max() / reference.abs().max()
    assert error <= tolerance
    assert not output.requires_grad


def test_official_steps_switch_the_adm_fast_path_off_and_leave_other_networks_alone():
    network = build_network(QUICK).eval()
    assert network.cpu_fast_path and not bench.apply_variant(network, "official_steps").module.cpu_fast_path
    wrn = build_network({"family": "robustbench_wrn", "config": {"depth": 10, "widen_factor": 1}}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bench.apply_variant(wrn, "official_steps")(x), wrn(x))


def test_apply_variant_with_gradients_lets_attacks_differentiate():
    network = randomised(build_network(QUICK))
    x, t = bench.example_inputs(network, QUICK, 1)
    x.requires_grad_(True)
    bench.apply_variant(network, "channels_last+bfloat16_autocast", gradients=True)(x, t).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="inference_mode"):
        bench.apply_variant(network, "inference_mode", gradients=True)


@pytest.mark.parametrize("name", ["float16", "compile+compile", "channels_last+", "float32+compile"])
def test_unknown_variants_are_rejected(name):
    with pytest.raises(ConfigError, match="unknown variant"):
        bench.variant_features(name)


@pytest.mark.parametrize("architecture, output_shape, torch_layers", [
    ({"family": "robustbench_wrn", "config": {"depth": 10, "widen_factor": 1}}, (2, 10), True),
    ({"family": "robustbench_dm_wrn", "config": {"depth": 10, "width": 1, "activation_fn": "Swish"}}, (2, 10), True),
    ({"family": "edm_vp_songunet", "config": {"img_resolution": 16, "img_channels": 3, "label_dim": 10,
                                              "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                                              "attn_resolutions": [8]}}, (2, 3, 16, 16), False),
    ({"family": "guided_diffusion_unet", "config": {"image_size": 64, "num_channels": 32, "num_res_blocks": 1,
                                                    "channel_mult": "1,2", "attention_resolutions": "32",
                                                    "class_cond": True, "num_head_channels": 16}}, (2, 3, 64, 64),
     True),
])
def test_every_family_gets_inputs_and_a_flop_count(architecture, output_shape, torch_layers):
    network = build_network(architecture).eval()
    args = bench.example_inputs(network, architecture, 2)
    assert bench.apply_variant(network, "channels_last")(*args).shape == output_shape
    per_image = bench.flops_per_image(network, architecture)
    assert per_image > 0 and bench.count_flops(network, *bench.example_inputs(network, architecture, 1)) == per_image
    if torch_layers:  # EDM has its own Conv2d/Linear modules, which the hook count does not know
        assert per_image * 2 == layer_by_layer_flops(network, args)


def test_example_inputs_come_from_one_table_of_known_families():
    from diffrobust.models import FAMILIES

    assert set(bench.EXAMPLE_INPUTS) <= set(FAMILIES)
    assert bench.EXAMPLE_INPUTS["guided_diffusion_unet"] is bench.EXAMPLE_INPUTS["improved_diffusion_unet"]
    with pytest.raises(ConfigError, match="no example inputs for network family 'small_resnet'.*robustbench_wrn"):
        bench.example_inputs(None, {"family": "small_resnet"}, 1)


def test_resolve_network_reads_registry_names_and_json_blocks():
    label, architecture = bench.resolve_network(bench.DEFAULT_NETWORK)
    assert label == bench.DEFAULT_NETWORK and architecture["config"]["num_res_blocks"] == 3
    assert bench.resolve_network(json.dumps(QUICK)) == ("improved_diffusion_unet", QUICK)
    with pytest.raises(ConfigError, match="registry names:.*improved_diffusion_cifar10_uncond"):
        bench.resolve_network("no_such_network")
    with pytest.raises(ConfigError, match="no architecture block"):
        bench.resolve_network("stable_diffusion_v1_4")


# ---------------------------------------------------------------------------------------------------------------
# The report


@pytest.fixture(scope="module")
def quick_report():
    return bench.run_benchmark(QUICK, batch_sizes=(1, 2), variants=EAGER_VARIANTS, warmup=1, repeats=2,
                               matmul_size=128, log=lambda message: None)


def test_report_numbers_follow_from_its_own_timings(quick_report):
    report = quick_report
    network = build_network(QUICK).eval()
    assert report["flops_per_image"] == bench.flops_per_image(network, QUICK)
    assert report["parameters"] == sum(p.numel() for p in network.parameters())
    assert report["threads"] == [1] and set(report["matmul_peak_gflops"]) == {1}  # the module's one thread
    peak = report["matmul_peak_gflops"][1]["float32"]
    rows = {(row["variant"], row["batch_size"]): row for row in report["rows"]}
    assert set(rows) == {(variant, size) for variant in EAGER_VARIANTS for size in (1, 2)}
    for (variant, batch_size), row in rows.items():
        assert row["error"] is None and row["threads"] == 1
        assert row["min_batch_s"] <= row["median_batch_s"] <= row["max_batch_s"]
        assert row["images_per_s"] == pytest.approx(batch_size / row["median_batch_s"])
        assert row["gflops_per_s"] == pytest.approx(report["flops_per_image"] * row["images_per_s"] / 1e9)
        assert row["fraction_of_fp32_peak"] == pytest.approx(row["gflops_per_s"] / peak)
        baseline = rows[("float32", batch_size)]["images_per_s"]
        assert row["speedup_vs_float32"] == pytest.approx(row["images_per_s"] / baseline)
    for batch_size in (1, 2):
        winner = max(EAGER_VARIANTS, key=lambda variant: rows[(variant, batch_size)]["images_per_s"])
        assert report["fastest"][1][batch_size]["variant"] == winner == bench.fastest_variant(report, batch_size)
    assert bench.fastest_variant(report) == report["fastest"][1][2]["variant"]  # default: the largest batch size


def test_each_thread_count_is_measured_against_its_own_matmul_peak():
    torch.set_num_threads(3)  # the caller's setting, restored afterwards
    report = bench.run_benchmark(QUICK, batch_sizes=(1,), variants=("float32",), warmup=1, repeats=1,
                                 matmul_size=64, threads=(1, 2), log=lambda message: None)
    assert torch.get_num_threads() == 3
    torch.set_num_threads(1)
    assert report["threads"] == [1, 2] and set(report["matmul_peak_gflops"]) == {1, 2}
    assert [(row["threads"], row["variant"]) for row in report["rows"]] == [(1, "float32"), (2, "float32")]
    for row in report["rows"]:
        peak = report["matmul_peak_gflops"][row["threads"]]["float32"]
        assert row["fraction_of_fp32_peak"] == pytest.approx(row["gflops_per_s"] / peak)
        assert row["speedup_vs_float32"] == 1.0
    assert set(report["fastest"]) == {1, 2}
    table = bench.format_table(report)
    assert "matmul peak at 1 thread(s)" in table and "matmul peak at 2 thread(s)" in table
    assert "fastest at 2 thread(s), batch 1: float32" in table


def test_table_prints_every_row_and_the_winners(quick_report):
    table = bench.format_table(quick_report)
    for row in quick_report["rows"]:
        line = next(line for line in table.splitlines()
                    if line.split()[:3] == [str(row["threads"]), row["variant"], str(row["batch_size"])])
        assert f"{row['images_per_s']:.2f}" in line and f"{row['speedup_vs_float32']:.2f}x" in line
    for batch_size, best in quick_report["fastest"][1].items():
        assert f"fastest at 1 thread(s), batch {batch_size}: {best['variant']} ({best['images_per_s']:.2f} images/s" \
            in table


def test_fastest_variant_ignores_failures_and_defaults_to_the_largest_batch():
    rows = [dict.fromkeys(bench.ROW_FIELDS) | {"threads": 1} | row for row in (
        {"variant": "float32", "batch_size": 1, "images_per_s": 2.0},
        {"variant": "channels_last", "batch_size": 1, "images_per_s": 3.0},
        {"variant": "compile", "batch_size": 1, "error": "RuntimeError: no compiler"},
        {"variant": "float32", "batch_size": 8, "images_per_s": 9.0},
        {"variant": "bfloat16_autocast", "batch_size": 8, "images_per_s": 12.0},
    )]
    assert bench.fastest_variant(rows, batch_size=1) == "channels_last"
    assert bench.fastest_variant(rows) == "bfloat16_autocast"
    two_threads = rows + [dict.fromkeys(bench.ROW_FIELDS) | {"threads": 2, "variant": "float32", "batch_size": 8,
                                                              "images_per_s": 15.0}]
    assert bench.fastest_variant(two_threads) == "float32"  # default: the largest thread count
    assert bench.fastest_variant(two_threads, threads=1) == "bfloat16_autocast"
    with pytest.raises(ValueError, match="thread count 4"):
        bench.fastest_variant(two_threads, threads=4)
    with pytest.raises(ValueError, match="batch size 4"):
        bench.fastest_variant(rows, batch_size=4)
    with pytest.raises(ValueError, match="no successful"):
        bench.fastest_variant(rows[2:3])


def _compile_that_raises(network, **kwargs):
    raise RuntimeError("inductor: no working C++ compiler")


def _compile_that_fails_when_called(network, **kwargs):
    def compiled(*args):
        raise RuntimeError("inductor: no working C++ compiler")
    return compiled


@pytest.mark.parametrize("fake_compile", [_compile_that_raises, _compile_that_fails_when_called])
def test_a_failing_variant_is_reported_not_fatal(monkeypatch, fake_compile):
    monkeypatch.setattr(torch, "compile", fake_compile)
    report = bench.run_benchmark(QUICK, batch_sizes=(1,), variants=("compile",), warmup=1, repeats=1,
                                 matmul_size=64, log=lambda message: None)
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"float32", "compile"}  # the baseline is always measured
    assert rows["compile"]["error"] == "RuntimeError: inductor: no working C++ compiler"
    assert rows["compile"]["images_per_s"] is None and rows["float32"]["images_per_s"] > 0
    assert bench.fastest_variant(report) == "float32"
    assert f"{1:>7}  {'compile':<24}{1:>6}  FAILED: RuntimeError: inductor" in bench.format_table(report)


def test_command_line_quick_run_writes_json_and_csv(tmp_path, capsys):
    torch.set_num_threads(2)  # the caller's setting, to be restored after the run (which uses --threads 1)
    parser = bench.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--quick", "--batch-sizes", "1", "--variants", "float32,channels_last",
                              "--repeats", "1", "--matmul-size", "64", "--threads", "1",
                              "--out", str(tmp_path / "bench.json"), "--out", str(tmp_path / "bench.csv")])
    report = bench.run(args)
    assert (report["threads"], torch.get_num_threads()) == ([1], 2)
    torch.set_num_threads(1)
    assert "fastest at 1 thread(s), batch 1:" in capsys.readouterr().out
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == report["rows"] and saved["architecture"] == QUICK
    with open(tmp_path / "bench.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(row["variant"], int(row["batch_size"])) for row in table] == [("float32", 1), ("channels_last", 1)]
    assert [float(row["images_per_s"]) for row in table] == [row["images_per_s"] for row in report["rows"]]
    with pytest.raises(ConfigError, match=r"\.json or \.csv"):
        bench.write_report(report, tmp_path / "bench.txt")
    assert report["device"] == "cpu" and "device: cpu" in bench.format_table(report)


def test_command_line_refuses_a_gpu_that_is_not_there():
    from diffrobust.device import DeviceError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # the refusal is for machines without one
    args = bench.add_arguments(argparse.ArgumentParser()).parse_args(["--quick", "--device", "cuda"])
    with pytest.raises(DeviceError, match="--device = 'cuda', but this machine has no CUDA GPU"):
        bench.run(args)


# --- bench-certify ----------------------------------------------------------------------------------------------------

def test_the_bench_tables_pad_each_title_and_its_cells_alike():
    from diffrobust.bench import format_table

    columns = (("name", "<6", lambda r: r["name"]), ("n", ">4", lambda r: r["n"]),
               ("speedup", ">7", lambda r: f"{r['s']:.2f}x"))
    text = format_table(columns, [{"name": "a", "n": 3, "s": 1.5}, {"name": "longname", "n": 12345, "s": 10}])
    assert text.splitlines() == ["name      n speedup", "-" * 19, "a         3   1.50x",
                                 "longname 12345  10.00x"]  # a cell longer than its column widens its line
    assert format_table(columns, []) == "name      n speedup\n" + "-" * 19


def test_bench_certify_mini_size_is_the_mini_presets_networks_and_its_shares_add_up():
    from diffrobust.bench import certify as bench_certify
    from diffrobust.config import load_config

    spec = bench_certify.SIZES["mini"]()
    preset = load_config({"preset": "mini"})["models"]
    assert spec["diffusion"]["config"]["patch_size"] == preset["diffusion"]["architecture"]["config"]["patch_size"]
    assert spec["variance"] == preset["diffusion"]["variance"] == "fixed_small"
    row = bench_certify.measure("mini", batch_size=2, reverse="respaced", num_steps=2, repeats=1)
    assert row["steps"] == 2  # S = 2 network calls per reverse run
    assert row["diffusion_share"] + row["classifier_share"] == pytest.approx(1.0)
    assert 0 < row["diffusion_share"] < 1
    assert row["samples_per_second"] == pytest.approx(2 / row["seconds_per_batch"])
    from diffrobust.models import build_architecture

    assert row["diffusion_parameters"] == sum(p.numel() for p in build_architecture(spec["diffusion"]).parameters())


@pytest.mark.parametrize("plan", [
    {"method": "autoattack", "version": "rand", "n_iter": 3, "eot_iter": 2},
    {"method": "autoattack", "version": "standard", "n_iter": 3, "n_target_classes": 2, "n_queries": 5},
    {"method": "autoattack", "version": "custom", "attacks": ["apgd-dlr"], "n_iter": 3},
    {"method": "eot_pgd", "steps": 3, "step_size": 1e-6, "eot_attack_reps": 2, "eot_defense_reps": 3},
])
def test_the_attack_bench_counts_the_gradients_an_attack_takes_when_nothing_breaks(plan):
    from torch import nn

    from diffrobust.attacks import run_attack
    from diffrobust.bench.attacks import gradient_evaluations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(25, 10))
    x = torch.rand(6, 1, 5, 5)
    result = run_attack(model, x, model(x).argmax(1), threat="linf", eps=1e-6, settings=plan)
    assert result.gradient_images == 6 * gradient_evaluations(plan)


def test_the_rdc_bench_counts_k_times_fewer_evaluations_for_the_multi_head_classifier():
    from diffrobust.bench import rdc as bench_rdc

    rows = bench_rdc.dc_costs("mini", points=(3,), lm_steps=2, batch_size=1, repeats=1)
    single, multi = rows
    assert (single["head"], single["network_evaluations"], multi["network_evaluations"]) == ("single", 30, 3)
    # seconds are per-evaluation times x evaluations: the ratio of the forwards is K x the ratio of the per-call times
    assert single["dc_forward_s"] > 0 and multi["dc_gradient_s"] > multi["dc_forward_s"] > 0
    assert single["rdc_forward_s"] > single["dc_forward_s"]
    assert "single/multi" in bench_rdc.format_rows(rows)


def test_bench_certify_gives_the_paper_scale_seconds_per_image_and_takes_a_device_and_precision(capsys):
    import argparse

    from diffrobust.bench import certify as bench_certify
    from diffrobust.device import DeviceError

    row = bench_certify.measure("mini", batch_size=2, reverse="one_shot", repeats=1)
    # N0 + N = 100,100 noisy samples of one image at the measured rate
    assert row["seconds_per_paper_image"] == pytest.approx(100_100 / row["samples_per_second"])
    assert bench_certify.measure("mini", batch_size=2, reverse="respaced", num_steps=2,
                                 repeats=1)["seconds_per_paper_image"] is None
    parser = bench_certify.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--sizes", "mini", "--batch-size", "2", "--repeats", "1", "--votes", "0",
                              "--precision", "bf16"])
    rows = bench_certify.run(args)
    assert "device cpu, precision bf16" in capsys.readouterr().out and len(rows) == 2
    assert rows[0]["seconds_per_paper_image"] > 0
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device"):
            bench_certify.run(parser.parse_args(["--sizes", "mini", "--device", "cuda"]))


def test_bench_certify_compares_branched_votes_with_the_per_vote_loop_in_one_run():
    from diffrobust.bench import certify as bench_certify

    row = bench_certify.measure_votes("mini", votes=3, num_steps=2, batch_size=2, repeats=1)
    assert row["labels_agree"]
    assert row["call_ratio"] == pytest.approx(6 / 4)  # K·S = 6 calls against 1 + K(S - 1) = 4
    assert row["per_vote_seconds"] > 0 and row["branched_seconds"] > 0
    assert "branched" in bench_certify.format_vote_rows([row]).splitlines()[0]
