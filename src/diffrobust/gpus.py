"""What GPUs this machine shows, without importing torch: the DAG build asks (workflow/rules/common.smk) to decide
whether jobs that run networks claim the `gpu` resource, and a DAG build must stay fast."""

import glob
import os


def visible_nvidia_gpus():
    """NVIDIA GPUs visible to jobs started here: the /dev/nvidiaN device files, none when CUDA_VISIBLE_DEVICES hides
    them all (an empty value or -1)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    return len(glob.glob(os.path.join(os.sep, "dev", "nvidia[0-9]*")))
