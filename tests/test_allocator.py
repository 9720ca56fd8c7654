"""`diffrobust.allocator`: glibc's malloc told to keep freed memory (every `diffrobust` command does it at start)."""

import os
import platform
import subprocess
import sys

import pytest

from diffrobust import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def fresh_process(environment):
    """keep_freed_memory() and freed_memory_kept() in a new interpreter (the settings are per process)."""
    code = ("from diffrobust.allocator import keep_freed_memory, freed_memory_kept; "
            "print(keep_freed_memory(), freed_memory_kept(), keep_freed_memory())")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **environment}, capture_output=True,
                            text=True, check=True)
    return result.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_glibc_takes_the_settings_once_per_process():
    assert fresh_process({"DIFFROBUST_MALLOC": ""}) == ["True", "True", "True"]


def test_the_system_defaults_can_be_kept():
    assert fresh_process({"DIFFROBUST_MALLOC": "system"}) == ["False", "False", "False"]


def test_the_thresholds_fit_mallopts_int_argument():
    assert 0 < allocator.MMAP_THRESHOLD <= allocator.TRIM_THRESHOLD <= 2**31 - 1
