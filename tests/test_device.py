"""`diffrobust.device.OnDevice`: a network on a device, at a precision, optionally through torch.compile, keeps its
own parameters and gives the eager outputs; settings the device cannot run are refused before any work."""

import pytest
import torch

from diffrobust.device import COMPILE_MODES, DeviceError, OnDevice


def tiny_network():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)).eval()


def test_compiled_network_gives_the_eager_outputs_and_keeps_one_copy_of_its_weights():
    network = tiny_network()
    eager, compiled = OnDevice(network, "cpu"), OnDevice(network, "cpu", compile="default")
    assert list(compiled.state_dict()) == list(eager.state_dict()) == ["module.0.weight", "module.0.bias",
                                                                       "module.2.weight", "module.2.bias"]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, out = eager(x), compiled(x)
    assert out.dtype == torch.float32 and expected.abs().max() > 0.1
    assert (out - expected).abs().max().item() < 1e-5


def test_unknown_compile_modes_and_cuda_graphs_off_a_gpu_are_refused():
    assert "reduce-overhead" in COMPILE_MODES
    with pytest.raises(DeviceError, match="compile = 'fast'"):
        OnDevice(tiny_network(), "cpu", compile="fast")
    with pytest.raises(DeviceError, match="CUDA graphs and needs a GPU"):
        OnDevice(tiny_network(), "cpu", compile="reduce-overhead")
