"""Benchmarks that print figures (ratios against a reference measured in the same run), never timed tests.

- `networks`: forward throughput of a diffusion network against the matmul peak (`diffrobust bench`).
- `certify`: noisy samples/s through denoise + classify, with time shares (`diffrobust bench-certify`).
- `attacks`: adaptive-attack cost per image on DiffPure, `full` and `bpda` gradients (`diffrobust bench-attack`).
- `rdc`: diffusion classifier / RDC cost per image, single- against multi-head (`diffrobust bench-rdc`).
- `gpu_check`: GPU against CPU, label agreement and samples/s (`diffrobust gpu-check`).
"""

import time


def median_seconds(call, repeats, warmup=0):
    """Median wall time of `repeats` calls of `call()` after `warmup` untimed ones (compilation, caches); the median
    resists one slow call on a shared machine."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def interleaved_median_seconds(calls, repeats):
    """Median wall time of each of `calls`, timed in `repeats` rounds that call each once (after one untimed
    warm-up call each), so that a change of load on a shared machine hits all of them alike and their ratios hold."""
    for call in calls:
        call()
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, samples in zip(calls, times):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
    return [sorted(samples)[len(samples) // 2] for samples in times]
