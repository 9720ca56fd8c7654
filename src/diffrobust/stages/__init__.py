"""The workflow jobs of each paper: one module per paper, composing the library (networks, diffusion, defenses,
attacks, certify) into what one Snakemake rule runs through `diffrobust <subcommand>`.

A stage unpacks its config block once and calls library functions with keyword arguments. Library code never
imports `stages` or `cli` (tests/test_layout.py checks it).

- `densepure`: DensePure Table 1 and the Carlini et al. DDS baseline (certification shards, the K-vote merge).
- `robustness`: what the DiffPure and RDC tables share (attack shards, stored sets, evaluation, masking checks);
  `diffpure` and `rdc` are those two tables.
- `pixel_barrier`: Pixel is a Barrier / PDM-Pure (protective perturbations, edits, the three claims).
- `plan`: what the DAG asks of the stages when it is built (shard counts, attacks per defense, model roles),
  torch-free so that a dry run stays fast.
"""
