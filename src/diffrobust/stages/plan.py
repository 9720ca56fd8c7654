"""What the DAG asks of the stages when Snakemake builds it (workflow/rules/common.smk): how many shards a subset
makes, which attacks run against which defense, which model roles a defense loads, and which model source a job at
a threat reads. Pure functions of the config, and torch-free on purpose: a no-op run or a dry run must not import
torch (issue 14). The stage modules use these same definitions.
"""

from diffrobust import data

# the derived checks' suffixes, the attack-name pattern and reserved_suffix live in config (the DAG-build checks
# use them; library code does not import stages): re-exported here, the stage API
from diffrobust.config import (ATTACK_NAME_PATTERN, DERIVED_SUFFIXES, LARGE, MORE, base_attack,  # noqa: E402,F401
                               reserved_suffix)

# RDC table: the model roles each defense loads
RDC_ROLES = {"undefended": ("classifier",), "adversarial": ("adversarial",), "dc": ("conditional",),
             "rdc": ("conditional", "unconditional"), "dc_multihead": ("multihead",),
             "rdc_multihead": ("multihead", "unconditional")}


def num_shards(subset, split_size, shard_size, name="subset"):
    """Shards of `shard_size` images that the subset `subset` of a `split_size`-image split makes (`name` is the
    subset's name in error messages)."""
    return -(-len(data.subset_indices(subset, split_size, name=name)) // shard_size)


def threat_source(source, threat):
    """The model source a job at `threat` loads: `source` itself, or its entry for `threat` where the config names
    one source per threat model (RDC's adversarially trained baselines: an l-inf and an l2 checkpoint)."""
    from diffrobust.errors import DiffrobustError

    if not isinstance(source, dict):
        return source
    if threat not in source:
        raise DiffrobustError(f"no model source for threat {threat!r}: the per-threat sources name only "
                              f"{', '.join(sorted(source))}")
    return source[threat]


def attack_names(settings):
    """Every attack of a stage: the configured ones, then the two derived for the checks."""
    check = settings["checks"]["attack"]
    return list(settings["attacks"]) + [check + MORE, check + LARGE]


def diffpure_defense_attacks(settings, defense):
    """Attacks run against `defense` in the DiffPure table: all of them against DiffPure; against the undefended
    classifier the configured ones (the 'undefended falls under the same attack' check), not the derived ones."""
    return attack_names(settings) if defense == "diffpure" else list(settings["attacks"])


def rdc_defense_attacks(settings, defense):
    """Attacks run against `defense` in the RDC table: RDC gets every configured one and the derived checks (it is
    the defense the table is about); the defenses of `all_attacks_on` every configured one; the others
    `checks.attack` only."""
    if defense == "rdc":
        return attack_names(settings)
    if defense in settings["all_attacks_on"]:
        return list(settings["attacks"])
    return [settings["checks"]["attack"]]


DEFENSE_ATTACKS = {"diffpure": diffpure_defense_attacks, "rdc": rdc_defense_attacks}


def sweep_heads(settings):
    """(head, model role, DC settings key) of RDC's sigma sweep: single-head, and multi-head where the table has
    it."""
    heads = [("single", "conditional", "dc")]
    if {"dc_multihead", "rdc_multihead"} & set(settings["defenses"]):
        heads.append(("multi", "multihead", "multihead_dc"))
    return heads
