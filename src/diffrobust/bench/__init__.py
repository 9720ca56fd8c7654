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
    return interleaved_median_seconds([call], repeats, warmup)[0]


def interleaved_median_seconds(calls, repeats, warmup=1):
    """Median wall time of each of `calls`, timed in `repeats` rounds that call each once (after `warmup` untimed
    calls each), so that a change of load on a shared machine hits all of them alike and their ratios hold."""
    for call in calls:
        for _ in range(warmup):
            call()
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, samples in zip(calls, times):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
    return [sorted(samples)[len(samples) // 2] for samples in times]


def format_table(columns, rows):
    """A fixed-width text table as the bench commands print it: the columns' titles, a line of dashes as long, then
    one line per row, the cells separated by one space.

    `columns`: (title, spec, text) per column: `spec` is a format spec that aligns and pads the title and each cell
    ("<8": left in 8 characters, ">10": right in 10; a longer text widens its line, as in an f-string), and
    `text(row)` gives the cell (its str())."""
    def line(cells):
        return " ".join(f"{cell:{spec}}" for cell, (_, spec, _) in zip(cells, columns))

    header = line(title for title, _, _ in columns)
    return "\n".join([header, "-" * len(header)] + [line(str(text(row)) for _, _, text in columns) for row in rows])
