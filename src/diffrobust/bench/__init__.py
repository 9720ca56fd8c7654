"""Benchmarks that print figures (ratios against a reference measured in the same run), never timed tests.

- `networks`: forward throughput of a diffusion network against the matmul peak (`diffrobust bench`).
- `certify`: noisy samples/s through denoise + classify, with time shares (`diffrobust bench-certify`).
- `gpu_check`: GPU against CPU, label agreement and samples/s (`diffrobust gpu-check`).
"""
