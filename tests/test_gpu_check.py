"""`diffrobust gpu-check`: its comparisons measure what they say (run here CPU against CPU, where fp32 must agree
exactly and bf16 must not), and on a machine without a GPU it says so and exits 1 without a traceback."""

import os
import subprocess
import sys

import pytest

from diffrobust.bench import gpu_check
from diffrobust.device import DeviceError

SMALL = {"images": 2, "draws": 8, "sigma": 0.5, "batch_size": 8}


def test_the_same_device_and_precision_agree_exactly():
    row = gpu_check.compare("mini", "respaced", 2, 2, ("cpu", "fp32"), ("cpu", "fp32"), **SMALL)
    assert row["label_agreement"] == 1.0 and row["max_logit_difference"] == 0.0
    assert row["reference_samples_per_s"] > 0 and row["candidate_samples_per_s"] > 0


def test_reduced_precision_shows_up_as_a_logit_difference():
    row = gpu_check.compare("mini", "one_shot", None, 1, ("cpu", "fp32"), ("cpu", "bf16"), **SMALL)
    assert 0 < row["max_logit_difference"] < 5  # bf16 keeps 8 bits of mantissa: visible, but not garbage
    assert 0.0 <= row["label_agreement"] <= 1.0
    assert "bf16" in gpu_check.format_rows([row])
    # one DDS image at paper scale: N0 + N = 100,100 draws at the candidate's measured rate
    assert row["candidate_seconds_per_paper_image"] == pytest.approx(100_100 / row["candidate_samples_per_s"])
    assert "s/image N=1e5" in gpu_check.format_rows([row]).splitlines()[0]


def test_without_a_gpu_it_says_so_and_exits_1():
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this also holds on a machine that has one
    result = subprocess.run([sys.executable, "-m", "diffrobust", "gpu-check"], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    assert "no CUDA GPU here" in result.stderr and "Traceback" not in result.stderr


def test_variants_name_a_precision_and_optionally_a_compile_mode():
    assert gpu_check.variant_settings("tf32") == ("fp32", True, "none")
    assert gpu_check.variant_settings("bf16+reduce-overhead") == ("bf16", False, "reduce-overhead")
    for name in gpu_check.PAPER_VARIANTS:
        gpu_check.variant_settings(name)
    for bad in ("fp8", "bf16+fast", "bf16+"):
        with pytest.raises(DeviceError, match="optionally"):
            gpu_check.variant_settings(bad)
