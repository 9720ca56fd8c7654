"""The workflow jobs of each paper: one module per paper, composing the library (networks, diffusion, defenses,
attacks, certify) into what one Snakemake rule runs through `diffrobust <subcommand>`.

A stage unpacks its config block once and calls library functions with keyword arguments. Library code never
imports `stages` or `cli` (tests/test_layout.py checks it).

- `densepure`: DensePure Table 1 and the Carlini et al. DDS baseline (certification shards, the K-vote merge).
"""
