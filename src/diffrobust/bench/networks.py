"""Forward-pass throughput of a registry network on the CPU (or a GPU, `--device cuda`): `diffrobust bench`.

For one network (by default the 52.5M-parameter improved-diffusion CIFAR-10 UNet, with random weights) this measures

- the FLOPs of one forward pass per image, counted by `torch.utils.flop_counter.FlopCounterMode` (convolutions,
  linear layers and matrix products: 2 FLOPs per multiply-add; normalisations, activations, softmax and resampling
  are not counted, so the count is the network's matrix work only);
- at each thread count (`torch.set_num_threads`; by default 1 and 2), a matrix-multiply peak (the best of square
  float32 `torch.mm` calls, and bfloat16 for reference) timed between the network calls at that same thread count,
  so that achieved GFLOP/s can be read as a fraction of what this machine's BLAS reaches with as many threads
  under the same load;
- images/s for each thread count, batch size and execution variant (after warm-up, the median over rounds that
  time every variant once, so that load changes on a shared CPU hit all variants alike), the achieved GFLOP/s, its
  fraction of the float32 matmul peak at the same thread count, and the speed-up over plain float32 (`float32`
  variant) at the same thread count and batch size.

A variant is `float32` (eval network, `torch.no_grad`) or a `+`-joined set of features applied on top of it:
`inference_mode`, `channels_last`, `bfloat16_autocast`, `compile`, `official_steps` (the ADM UNet without its CPU
fast path: the "before" of that change, in the same run). `apply_variant(network, name)` gives the
defenses the same configurations; `fastest_variant(results)` picks one from a benchmark's results.
Timings on a shared CPU are noisy: compare ratios measured in the same run, not absolute numbers across runs.

`--device cuda` runs the same on a GPU: network, inputs and matmul probes there, every timing synchronised, one
pass at torch's CPU thread count (threads only launch work there); the `tf32` feature lets float32 matrix products
and convolutions use TF32 (no effect on the CPU), and the peak is still float32's, so TF32 rows can exceed 100%.
"""

import contextlib
import copy
import csv
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffrobust.allocator import freed_memory_kept
from diffrobust.config import ConfigError, load_checkpoint_registry
from diffrobust.device import matmul_tf32, resolve_device, synchronize
from diffrobust.networks import build_network
from diffrobust.networks.adm import set_cpu_fast_path

BASELINE_VARIANT = "float32"
FEATURES = ("inference_mode", "channels_last", "bfloat16_autocast", "compile", "official_steps", "tf32")
DEFAULT_VARIANTS = (BASELINE_VARIANT, "inference_mode", "channels_last", "bfloat16_autocast", "compile")
DEFAULT_NETWORK = "improved_diffusion_cifar10_uncond"
DEFAULT_BATCH_SIZES = (1, 4, 16)

# --quick: a mini-size improved-diffusion UNet (same code path as the full one: residual blocks with scale-shift
# norm, attention at 16x16, learned sigma) and sizes small enough to finish in seconds. No `compile`: inductor's
# C++ compilation alone takes far longer than the rest of a quick run. One thread: on a shared CI runner whose
# cores are busy, OpenMP's threads wait for each other at every operator and a tiny network slows down ~50-fold.
QUICK_ARCHITECTURE = {
    "family": "improved_diffusion_unet",
    "config": {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "num_heads": 2,
               "attention_resolutions": "16", "learn_sigma": True, "dropout": 0.3},
}
QUICK_SETTINGS = {"batch_sizes": (1, 2), "variants": (BASELINE_VARIANT, "inference_mode", "channels_last",
                                                      "bfloat16_autocast"),
                  "warmup": 1, "repeats": 3, "matmul_size": 256, "threads": (1,)}
DEFAULT_THREADS = (1, 2)
FULL_SETTINGS = {"batch_sizes": DEFAULT_BATCH_SIZES, "variants": DEFAULT_VARIANTS,
                 "warmup": 2, "repeats": 5, "matmul_size": 2048, "threads": DEFAULT_THREADS}

# Row fields, in CSV column order. fraction_of_fp32_peak: of the float32 matmul peak at the row's thread count.
ROW_FIELDS = ("threads", "variant", "batch_size", "images_per_s", "median_batch_s", "min_batch_s", "max_batch_s",
              "first_call_s", "gflops_per_s", "fraction_of_fp32_peak", "speedup_vs_float32", "error")


# --------------------------------------------------------------------------------------------------------------
# Variants


def variant_features(name):
    """The set of features a variant name stands for: "float32" -> {}, "channels_last+compile" -> {both}."""
    if name == BASELINE_VARIANT:
        return frozenset()
    features = name.split("+")
    unknown = [feature for feature in features if feature not in FEATURES]
    if unknown or len(set(features)) != len(features):
        raise ConfigError(f"unknown variant {name!r}: a variant is {BASELINE_VARIANT!r} or a '+'-joined set of "
                          f"{', '.join(FEATURES)}")
    return frozenset(features)


def _to_channels_last(value):
    """4-D tensors -> channels_last memory format; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _first_floating_dtype(args):
    """dtype of the first floating-point tensor among `args` (the image, for every network here), or None."""
    for value in args:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    return None


def _cast_floating(output, dtype):
    """Floating tensors in `output` (a tensor, or a tuple/list/dict of them) cast to `dtype`."""
    if isinstance(output, torch.Tensor):
        return output.to(dtype) if output.is_floating_point() else output
    if isinstance(output, (tuple, list)):
        return type(output)(_cast_floating(value, dtype) for value in output)
    if isinstance(output, dict):
        return {key: _cast_floating(value, dtype) for key, value in output.items()}
    return output


def apply_variant(network, name, *, gradients=False):
    """A callable that runs `network(*args, **kwargs)` in the configuration of variant `name`.

    - `float32`: the network as it is, under `torch.no_grad()` (or with autograd when `gradients=True`);
    - `inference_mode`: under `torch.inference_mode()` (tensors it returns can never enter autograd, hence
      rejected with `gradients=True`);
    - `channels_last`: the network's 4-D weights and the 4-D inputs in channels_last memory format. This converts
      the network's parameters in place (as `Module.to` does); the function it computes is unchanged;
    - `bfloat16_autocast`: under `torch.autocast("cpu", torch.bfloat16)`; floating outputs are cast back to the
      dtype of the first floating input, so callers keep getting float32;
    - `compile`: `torch.compile(network, dynamic=False)` (one specialised graph per input shape; the first call
      at each shape compiles, which takes minutes for a large UNet on a small CPU);
    - `official_steps`: every ADM UNet in `network` without its CPU fast path (`networks.adm.set_cpu_fast_path`):
      the official steps and layout, which is what the network computed before that path; no effect on others;
    - `tf32`: TF32 float32 matrix products and convolutions while it runs (CUDA only; no effect on the CPU).

    Autocast runs on the device of the network's parameters.

    The train/eval mode is left as it is: put the network in eval mode first for deterministic outputs.
    """
    features = variant_features(name)
    if gradients and "inference_mode" in features:
        raise ConfigError("variant 'inference_mode' cannot be used with gradients=True")
    if "official_steps" in features:
        set_cpu_fast_path(network, False)
    if "channels_last" in features:
        network.to(memory_format=torch.channels_last)
    module = torch.compile(network, dynamic=False) if "compile" in features else network
    device_type = next(network.parameters()).device.type

    def grad_context():
        if "inference_mode" in features:
            return torch.inference_mode()
        return contextlib.nullcontext() if gradients else torch.no_grad()

    def autocast_context():
        if "bfloat16_autocast" in features:
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def call(*args, **kwargs):
        if "channels_last" in features:
            args = tuple(_to_channels_last(value) for value in args)
        with grad_context(), autocast_context(), matmul_tf32("tf32" in features):
            output = module(*args, **kwargs)
        output_dtype = _first_floating_dtype(args)
        if "bfloat16_autocast" in features and output_dtype is not None:
            # Autocast leaves the last layer's output in bfloat16; callers expect their own dtype back.
            output = _cast_floating(output, output_dtype)
        return output

    call.variant = name
    call.module = module
    return call


# --------------------------------------------------------------------------------------------------------------
# Networks and their inputs


def resolve_network(spec, registry=None):
    """(label, architecture block) for a registry name or a JSON architecture block ({"family", "config"})."""
    if isinstance(spec, dict):
        return spec.get("family", "custom"), spec
    if spec.lstrip().startswith("{"):
        try:
            architecture = json.loads(spec)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--network: not valid JSON: {error}") from None
        if not isinstance(architecture, dict) or "family" not in architecture:
            raise ConfigError('--network JSON must be an architecture block {"family": ..., "config": {...}}')
        return architecture["family"], architecture
    registry = load_checkpoint_registry() if registry is None else registry
    if spec not in registry:
        raise ConfigError(f"--network {spec!r} is neither a JSON architecture block nor a registry name; "
                          f"registry names: {', '.join(sorted(registry))}")
    if "architecture" not in registry[spec]:
        buildable = sorted(name for name, entry in registry.items() if "architecture" in entry)
        raise ConfigError(f"registry entry {spec!r} has no architecture block, so it cannot be built; "
                          f"buildable: {', '.join(buildable)}")
    return spec, registry[spec]["architecture"]


def _adm_inputs(network, batch_size):
    """improved-/guided-diffusion UNets: images, timestep 500 and, when class-conditional, class 0."""
    size = network.image_size
    args = [torch.randn(batch_size, network.in_channels, size, size), torch.full((batch_size,), 500.0)]
    if network.num_classes is not None:
        args.append(torch.zeros(batch_size, dtype=torch.long))
    return tuple(args)


def _edm_inputs(network, batch_size):
    """EDM's SongUNet: images, noise level 0.5 and, when class-conditional, a one-hot class 0."""
    size, channels = network.img_resolution, network.img_channels
    args = [torch.randn(batch_size, channels, size, size), torch.full((batch_size,), 0.5)]
    if network.label_dim:
        args.append(torch.nn.functional.one_hot(torch.zeros(batch_size, dtype=torch.long),
                                                network.label_dim).float())
    return tuple(args)


def _cifar10_classifier_inputs(network, batch_size):
    """CIFAR-10 classifiers: 32x32 RGB images (RobustBench's WideResNets' pooling assumes that size)."""
    return (torch.randn(batch_size, 3, 32, 32),)


# Positional arguments of one forward pass, by network family: family -> inputs(network, batch_size).
EXAMPLE_INPUTS = {
    "improved_diffusion_unet": _adm_inputs,
    "guided_diffusion_unet": _adm_inputs,
    "edm_vp_songunet": _edm_inputs,
    "robustbench_wrn": _cifar10_classifier_inputs,
    "robustbench_dm_wrn": _cifar10_classifier_inputs,
}


def example_inputs(network, architecture, batch_size):
    """Positional arguments for one forward pass of a batch, from the family's entry of `EXAMPLE_INPUTS`.

    Diffusion networks get a mid-trajectory noise level (the cost does not depend on it) and, when
    class-conditional, class 0 for every image. Images are drawn from torch's global generator.
    """
    family = architecture["family"]
    if family not in EXAMPLE_INPUTS:
        raise ConfigError(f"no example inputs for network family {family!r} (families with inputs: "
                          f"{', '.join(sorted(EXAMPLE_INPUTS))})")
    return EXAMPLE_INPUTS[family](network, batch_size)


# --------------------------------------------------------------------------------------------------------------
# FLOPs and the matmul peak


def count_flops(function, *args, **kwargs):
    """FLOPs of one call of `function(*args, **kwargs)` under `FlopCounterMode` (2 per multiply-add).

    Counts convolutions, mm/addmm/bmm (hence linear layers and einsum products) and attention kernels, without
    their bias additions; elementwise and normalisation work is not counted.
    """
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        function(*args, **kwargs)
    return counter.get_total_flops()


def flops_per_image(network, architecture):
    """FLOPs of one forward pass per image, counted on a batch of two (every layer's cost scales with the batch)."""
    return count_flops(network, *example_inputs(network, architecture, 2)) // 2


class MatmulProbe:
    """Square n x n x n `torch.mm` (2 n^3 FLOPs) of one dtype, timed once per call; `best_gflops` over all calls.

    Timed once per benchmark round, between the network calls, so that the peak is taken under the same load as
    the network timings (the best round is the least disturbed one).
    """

    def __init__(self, size, dtype=torch.float32, device="cpu"):
        self.size, self.device = size, torch.device(device)
        self.a = torch.randn(size, size).to(self.device, dtype)
        self.b = torch.randn(size, size).to(self.device, dtype)
        self.out = torch.empty(size, size, dtype=dtype, device=self.device)
        torch.mm(self.a, self.b, out=self.out)  # warm-up: thread pool, BLAS kernel selection
        synchronize(self.device)
        self.best_seconds = math.inf

    def time_once(self):
        start = time.perf_counter()
        with matmul_tf32(False):  # the float32 peak is float32's, not TF32's
            torch.mm(self.a, self.b, out=self.out)
        synchronize(self.device)
        self.best_seconds = min(self.best_seconds, time.perf_counter() - start)

    @property
    def best_gflops(self):
        return 2 * self.size**3 / self.best_seconds / 1e9


def matmul_gflops(size=2048, repeats=5, dtype=torch.float32):
    """Best GFLOP/s of an n x n x n `torch.mm` over `repeats` timed calls after one warm-up."""
    probe = MatmulProbe(size, dtype)
    for _ in range(repeats):
        probe.time_once()
    return probe.best_gflops


# --------------------------------------------------------------------------------------------------------------
# Timing


def seconds_of_call(call, args):
    """Wall seconds of `call(*args)`, including the GPU work it queued (synchronised on the first input's device)."""
    start = time.perf_counter()
    call(*args)
    synchronize(args[0].device)
    return time.perf_counter() - start


def _error_text(error):
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def add_derived_columns(rows, flops, fp32_peak_gflops):
    """Fill images/s, GFLOP/s, fraction of the fp32 matmul peak and speed-up over float32 from the timings.

    `rows`: those of one thread count, `fp32_peak_gflops` the peak measured at that thread count."""
    succeeded = [row for row in rows if row["error"] is None]
    for row in succeeded:
        row["images_per_s"] = row["batch_size"] / row["median_batch_s"]
    baseline = {row["batch_size"]: row["images_per_s"] for row in succeeded if row["variant"] == BASELINE_VARIANT}
    for row in succeeded:
        row["gflops_per_s"] = flops * row["images_per_s"] / 1e9
        row["fraction_of_fp32_peak"] = row["gflops_per_s"] / fp32_peak_gflops
        if row["batch_size"] in baseline:
            row["speedup_vs_float32"] = row["images_per_s"] / baseline[row["batch_size"]]
    return rows


def benchmark_batch_size(calls, args, batch_size, warmup, repeats, probes, log=print, threads=None):
    """Rows for one batch size: warm every variant up, then time them in interleaved rounds.

    Each round times each variant once (and each matmul probe once), so a change of load on a shared CPU hits all
    variants alike and their ratios stay meaningful; each variant's time is the median over rounds. A variant
    that raises gets an error row and drops out of the later rounds.
    """
    threads = torch.get_num_threads() if threads is None else threads
    rows = {variant: dict.fromkeys(ROW_FIELDS) | {"threads": threads, "variant": variant, "batch_size": batch_size}
            for variant in calls}
    samples = {variant: [] for variant in calls}

    def attempt(variant):
        """Seconds of one call, or None after recording the variant's error."""
        try:
            return seconds_of_call(calls[variant], args)
        except Exception as error:  # noqa: BLE001 - a failing variant is reported, not fatal
            rows[variant]["error"] = _error_text(error)
            log(f"  {threads} thread(s) {variant} batch {batch_size}: failed: {rows[variant]['error']}")
            return None

    for variant in calls:
        for index in range(max(warmup, 1)):  # at least one: the first call's time is reported
            seconds = attempt(variant)
            if seconds is None:
                break
            if index == 0:
                rows[variant]["first_call_s"] = seconds
                log(f"  {threads} thread(s) {variant} batch {batch_size}: first call {seconds:.2f} s")
    order = list(calls)
    for round_index in range(repeats):
        for probe in probes:
            probe.time_once()
        # Rotate the order each round so that no variant always runs right after the same one.
        shift = round_index % len(order)
        for variant in order[shift:] + order[:shift]:
            if rows[variant]["error"] is None:
                seconds = attempt(variant)
                if seconds is not None:
                    samples[variant].append(seconds)
    for variant, row in rows.items():
        if row["error"] is None:
            row["median_batch_s"] = statistics.median(samples[variant])
            # The spread shows how much the load moved during the rounds (max/min near 1: a quiet machine).
            row["min_batch_s"], row["max_batch_s"] = min(samples[variant]), max(samples[variant])
            images_per_s = batch_size / row["median_batch_s"]
            log(f"  {threads} thread(s) {variant} batch {batch_size}: {images_per_s:.2f} images/s")
    return list(rows.values())


def run_benchmark(network=DEFAULT_NETWORK, batch_sizes=DEFAULT_BATCH_SIZES, variants=DEFAULT_VARIANTS,
                  warmup=2, repeats=5, matmul_size=2048, seed=0, threads=None, log=print, device="cpu"):
    """Benchmark one network; returns a report dict (see `format_table`, `ROW_FIELDS`).

    `network`: a registry name or an architecture block (dict or JSON string). Each variant runs on its own copy
    of the same randomly initialised eval-mode network (all copies are alive at once: memory grows with the number
    of variants). A variant that fails (e.g. `compile` without a working C++ toolchain) becomes rows with its error
    instead of stopping the benchmark. `float32` is always measured, as the speed-ups' reference.

    `threads`: the thread counts to measure at, one after the other (default: torch's current count only); at each,
    `torch.set_num_threads` is set, the matmul peaks are measured afresh between that count's network calls, and
    each row's fraction of peak is against the float32 peak of its own thread count. The caller's thread count is
    restored at the end. `device`: where the network, its inputs and the matmul probes run (see the module
    docstring); the FLOPs are counted on the CPU first.
    """
    device = torch.device(device)
    for variant in variants:
        variant_features(variant)  # reject typos before minutes of work
    threads = (torch.get_num_threads(),) if threads is None else tuple(dict.fromkeys(threads))
    if repeats < 1 or not batch_sizes or not threads or min(threads) < 1:
        raise ConfigError(f"need at least one timed round, one batch size and one thread count (repeats={repeats}, "
                          f"batch_sizes={batch_sizes}, threads={threads})")
    variants = tuple(dict.fromkeys((BASELINE_VARIANT, *variants)))
    label, architecture = resolve_network(network)
    torch.manual_seed(seed)
    base_network = build_network(architecture).eval()
    parameters = sum(p.numel() for p in base_network.parameters())
    flops = flops_per_image(base_network, architecture)
    log(f"network {label}: {parameters:,} parameters, {flops / 1e9:.3f} GFLOP per image, on {device}")
    base_network.to(device)

    calls, failed = {}, {}
    for variant in variants:
        try:
            calls[variant] = apply_variant(copy.deepcopy(base_network), variant)
        except Exception as error:  # noqa: BLE001
            failed[variant] = _error_text(error)
    rows, peaks = [], {}
    threads_before = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            probes = {dtype: MatmulProbe(matmul_size, getattr(torch, dtype), device)
                      for dtype in ("float32", "bfloat16")}
            count_rows = []
            for batch_size in batch_sizes:
                torch.manual_seed(seed)
                args = tuple(value.to(device) for value in example_inputs(base_network, architecture, batch_size))
                count_rows += benchmark_batch_size(calls, args, batch_size, warmup, repeats, probes.values(), log,
                                                   threads=count)
                count_rows += [dict.fromkeys(ROW_FIELDS) | {"threads": count, "variant": variant,
                                                            "batch_size": batch_size, "error": error}
                               for variant, error in failed.items()]
            peaks[count] = {dtype: probe.best_gflops for dtype, probe in probes.items()}
            add_derived_columns(count_rows, flops, peaks[count]["float32"])
            rows += count_rows
    finally:
        torch.set_num_threads(threads_before)  # callers in the same process (tests) keep their setting
    return {
        "network": label,
        "architecture": architecture,
        "parameters": parameters,
        "flops_per_image": flops,
        "matmul_size": matmul_size,
        "matmul_peak_gflops": peaks,
        "warmup": warmup,
        "repeats": repeats,
        "seed": seed,
        "threads": list(threads),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "freed_memory_kept": freed_memory_kept(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "rows": rows,
        "fastest": {count: fastest_by_batch_size(rows, count) for count in threads},
    }


# --------------------------------------------------------------------------------------------------------------
# Reading the results


def _rows(results):
    return results["rows"] if isinstance(results, dict) else results


def _thread_count(results, threads):
    """`threads`, or by default the largest thread count among the rows (the count a multi-core job runs at)."""
    counts = {row["threads"] for row in _rows(results)}
    if threads is None:
        return max(counts) if counts else None
    if threads not in counts:
        raise ValueError(f"thread count {threads} was not measured (measured: {sorted(counts)})")
    return threads


def fastest_by_batch_size(results, threads=None):
    """{batch_size: {"variant", "images_per_s", "speedup_vs_float32"}} of the fastest successful variant at
    `threads` (default: the largest thread count measured)."""
    threads = _thread_count(results, threads)
    best = {}
    for row in _rows(results):
        if row["threads"] != threads:
            continue
        if row["error"] is None and (row["batch_size"] not in best
                                     or row["images_per_s"] > best[row["batch_size"]]["images_per_s"]):
            best[row["batch_size"]] = {key: row[key] for key in ("variant", "images_per_s", "speedup_vs_float32")}
    return dict(sorted(best.items()))


def fastest_variant(results, batch_size=None, threads=None):
    """Name of the variant with the most images/s at `batch_size` (default: the largest batch size measured,
    the regime of defenses that batch many noise draws) and `threads` (default: the largest thread count measured).
    `results`: a report or its rows. Failed rows never win."""
    best = fastest_by_batch_size(results, threads)
    if not best:
        raise ValueError("no successful benchmark rows")
    if batch_size is None:
        batch_size = max(best)
    if batch_size not in best:
        raise ValueError(f"batch size {batch_size} was not measured successfully (measured: {sorted(best)})")
    return best[batch_size]["variant"]


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(report):
    """The report as plain text: header, the peaks, one line per (threads, variant, batch size), the winners."""
    lines = [
        f"network: {report['network']} ({report['parameters']:,} parameters, "
        f"{report['flops_per_image'] / 1e9:.3f} GFLOP per image forward, 2 FLOP per multiply-add)",
        f"torch {report['torch']}; median of {report['repeats']} interleaved rounds after {report['warmup']} "
        f"warm-up call(s); freed memory kept for reuse: {'yes' if report.get('freed_memory_kept') else 'no'}",
        f"device: {report.get('device', 'cpu')}" + (f" ({report['gpu']})" if report.get("gpu") else ""),
    ]
    for threads, peak in report["matmul_peak_gflops"].items():
        lines.append(f"matmul peak at {threads} thread(s) ({report['matmul_size']}^3, best round): float32 "
                     f"{peak['float32']:.1f} GFLOP/s, bfloat16 {peak['bfloat16']:.1f} GFLOP/s")
    lines += [
        "'of fp32 peak': of the float32 matmul peak at the same thread count",
        "",
        f"{'threads':>7}  {'variant':<24}{'batch':>6}{'images/s':>11}{'GFLOP/s':>10}{'of fp32 peak':>14}"
        f"{'vs float32':>12}{'first call s':>14}{'max/min':>9}",
    ]
    for row in report["rows"]:
        if row["error"] is not None:
            lines.append(f"{row['threads']:>7}  {row['variant']:<24}{row['batch_size']:>6}  FAILED: {row['error']}")
            continue
        lines.append(
            f"{row['threads']:>7}  {row['variant']:<24}{row['batch_size']:>6}{row['images_per_s']:>11.2f}"
            f"{row['gflops_per_s']:>10.1f}{_fmt(row['fraction_of_fp32_peak'], '.1%'):>14}"
            f"{_fmt(row['speedup_vs_float32'], '.2f') + 'x':>12}"
            f"{row['first_call_s']:>14.2f}{row['max_batch_s'] / row['min_batch_s']:>9.2f}")
    lines.append("")
    for threads, fastest in report["fastest"].items():
        for batch_size, best in fastest.items():
            lines.append(f"fastest at {threads} thread(s), batch {batch_size}: {best['variant']} "
                         f"({best['images_per_s']:.2f} images/s, {_fmt(best['speedup_vs_float32'], '.2f')}x float32)")
    return "\n".join(lines)


def write_report(report, path):
    """Write the report as JSON (.json: everything) or CSV (.csv: the rows); the suffix picks the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(report, indent=2) + "\n")
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=("network", "flops_per_image", *ROW_FIELDS))
            writer.writeheader()
            for row in report["rows"]:
                writer.writerow({"network": report["network"], "flops_per_image": report["flops_per_image"], **row})
    else:
        raise ConfigError(f"--out {path}: the suffix must be .json or .csv")


# --------------------------------------------------------------------------------------------------------------
# Command line


def _int_list(text):
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _name_list(text):
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser):
    """Arguments of `diffrobust bench` (defaults None mean: the --quick or full setting)."""
    parser.add_argument("--network", help=f"registry name or JSON architecture block (default {DEFAULT_NETWORK}; "
                                          "with --quick a mini improved-diffusion UNet)")
    parser.add_argument("--batch-sizes", type=_int_list, help="comma-separated, default 1,4,16 (quick: 1,2)")
    parser.add_argument("--variants", type=_name_list,
                        help=f"comma-separated; each {BASELINE_VARIANT} or a '+'-joined set of {', '.join(FEATURES)} "
                             f"(default {','.join(DEFAULT_VARIANTS)}; quick: without compile)")
    parser.add_argument("--warmup", type=int, help="untimed calls per batch size (default 2, quick 1)")
    parser.add_argument("--repeats", type=int, help="timed calls per batch size, median taken (default 5, quick 3)")
    parser.add_argument("--matmul-size", type=int, help="n of the n^3 peak matmul (default 2048, quick 256)")
    parser.add_argument("--threads", type=_int_list,
                        help="comma-separated thread counts, each measured in turn with its own matmul peak "
                             "(torch.set_num_threads; default 1,2; quick: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (on a GPU: one pass at torch's "
                                                        "CPU thread count unless --threads is given)")
    parser.add_argument("--quick", action="store_true", help="tiny network and sizes: finishes in seconds")
    parser.add_argument("--out", action="append", default=[], help="write the report (.json or .csv; repeatable)")
    return parser


def run(args):
    """Run `diffrobust bench` from parsed arguments: print the table, write --out files, return the report."""
    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    network = args.network or (QUICK_ARCHITECTURE if args.quick else DEFAULT_NETWORK)
    device = resolve_device(getattr(args, "device", "cpu"), key="--device")
    if device.type == "cuda":  # CPU threads only launch GPU work: one pass, not one per count
        settings = {**settings, "threads": None}

    def pick(name):
        value = getattr(args, name)
        return settings[name] if value is None else value

    report = run_benchmark(network, batch_sizes=pick("batch_sizes"), variants=pick("variants"),
                           warmup=pick("warmup"), repeats=pick("repeats"), matmul_size=pick("matmul_size"),
                           seed=args.seed, threads=pick("threads"), device=device)
    print(format_table(report))
    for path in args.out:
        write_report(report, path)
    return report
