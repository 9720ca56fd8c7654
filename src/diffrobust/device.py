"""Where the networks run and in what precision: the `device` and `precision` config keys, in one place.

- device: "auto" (the first CUDA GPU when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N". Asking for CUDA
  on a machine without it is an error before any work starts, not a silent fall-back to a CPU run that would take
  weeks at paper scale.
- precision: "fp32" (default), "fp16" or "bf16": autocast around the network's forward; inputs are moved to the
  device and outputs come back as float32, so the diffusion arithmetic, the smoothing noise and the votes stay in
  float32 whatever the network runs in. fp16 autocast needs a GPU (the CPU has no fast fp16 kernels); bf16 runs on
  both.
- compile: "none" (default, eager), or a `torch.compile` mode: "default", "max-autotune", or "reduce-overhead"
  (inductor with CUDA graphs, which replay a recorded GPU launch sequence and so need a GPU and fixed shapes).

Randomness never depends on the device: every stage draws from CPU generators and moves the draws (see
`certify.sample_noise_labels` and `diffusion.noise_like`), so a seed means the same draws on a laptop and on a GPU.
The labels a GPU computes can still differ from the CPU's where a network output sits at a decision boundary (float
rounding); `diffrobust gpu-check` measures how often.
"""

import contextlib

import torch
from torch import nn

from diffrobust.errors import DiffrobustError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_MODES = ("none", "default", "max-autotune", "reduce-overhead")


class DeviceError(DiffrobustError, ValueError):
    """A device or precision this machine cannot provide."""


def cuda_available():
    return torch.cuda.is_available()


def resolve_device(name="auto", key="device"):
    """The torch.device for a config value (see the module docstring); `key` names the setting in errors."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not cuda_available():
            raise DeviceError(f"{key} = {name!r}, but this machine has no CUDA GPU that torch can use "
                              f"(torch {torch.__version__}, torch.cuda.is_available() is False). Use {key}: auto "
                              "(GPU when present, else CPU) or cpu, or install a CUDA build of torch on a GPU machine.")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{key} = {name!r}, but torch sees {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return torch.device(f"cuda:{index}")
    raise DeviceError(f"{key} = {name!r} is not a device; use auto, cpu, cuda or cuda:N")


def check_precision(precision, device, key="precision"):
    """Refuse a precision the device cannot run (fp16 autocast on the CPU)."""
    if precision not in PRECISIONS:
        raise DeviceError(f"{key} = {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise DeviceError(f"{key} = 'fp16' needs a GPU (the CPU has no fast fp16 kernels): use bf16 or fp32 there")
    return precision


def check_compile(mode, device, key="compile"):
    """Refuse a compile mode that is not one of COMPILE_MODES, and CUDA graphs off a GPU."""
    if mode not in COMPILE_MODES:
        raise DeviceError(f"{key} = {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if mode == "reduce-overhead" and torch.device(device).type != "cuda":
        raise DeviceError(f"{key} = 'reduce-overhead' records CUDA graphs and needs a GPU: use default or "
                          "max-autotune on the CPU")
    return mode


@contextlib.contextmanager
def matmul_tf32(enabled):
    """TF32 for float32 matrix products and convolutions on CUDA while the block runs (no effect on the CPU)."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def synchronize(device):
    """Wait for the device's queued work (CUDA runs asynchronously; timings must include it). No-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, precision):
    """A context running the enclosed network calls at `precision` on `device` (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


class OnDevice(nn.Module):
    """`module` on `device`, run under `precision` autocast and, if asked, `torch.compile`d with mode `compile`:
    tensor arguments are moved there first, floating outputs come back as float32 on the device. Gradients flow
    through (attacks need them). Compiled or not, parameters and state dict are the module's own."""

    def __init__(self, module, device, precision="fp32", compile="none"):
        super().__init__()
        self.device = torch.device(device)
        self.precision = check_precision(precision, self.device)
        self.compile_mode = check_compile(compile, self.device)
        self.module = module.to(self.device)
        # kept outside the module tree, so the state dict has no second (`_orig_mod.`) copy of the weights
        object.__setattr__(self, "_run", self.module if compile == "none" else
                           torch.compile(self.module, mode=compile, dynamic=False))

    def forward(self, *args, **kwargs):
        args = [_to(value, self.device) for value in args]
        kwargs = {key: _to(value, self.device) for key, value in kwargs.items()}
        cuda_graphs = self.compile_mode == "reduce-overhead"
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier outputs may be overwritten
        with autocast(self.device, self.precision):
            out = self._run(*args, **kwargs)
        if cuda_graphs:
            out = out.clone()  # the graph's output buffer is reused by the next replay; callers keep theirs
        return out.float() if out.is_floating_point() else out



def describe(device, precisions=None):
    """What a run record says about where it ran."""
    device = torch.device(device)
    # str(): torch.__version__ is a TorchVersion, which a weights-only torch.load (model files) refuses
    record = {"device": str(device), "precision": precisions, "torch": str(torch.__version__),
              "cuda": torch.version.cuda, "cuda_available": cuda_available()}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
        record["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return record
