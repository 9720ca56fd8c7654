"""Configuration: presets merged with overrides, defaults filled from the schema, then validated.

The merge order is: `config/presets/<preset>.yaml` < everything Snakemake was given (config/config.yaml,
--configfile, --config). Errors name the key, where its value came from, what is allowed and how to fix it.
"""

import copy
from pathlib import Path

import jsonschema
import yaml

from diffrobust.errors import DiffrobustError

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = REPO_ROOT / "config" / "presets"
CONFIG_SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
CHECKPOINTS_REGISTRY = REPO_ROOT / "config" / "checkpoints.yaml"
CHECKPOINTS_SCHEMA = REPO_ROOT / "workflow" / "schemas" / "checkpoints.schema.yaml"


class ConfigError(DiffrobustError, ValueError):
    """A configuration problem, with a message meant for the person running the workflow."""


def read_yaml(path):
    """Parse a YAML file; a syntax error names the file and line."""
    path = Path(path)
    try:
        with open(path) as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def available_presets(presets_dir=PRESETS_DIR):
    return sorted(path.stem for path in Path(presets_dir).glob("*.yaml"))


def deep_merge(base, override):
    """Return `base` updated recursively with `override` (dicts merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def fill_defaults(schema, instance):
    """Fill missing keys from the schema's `default`s, recursing into objects (also inside defaults)."""
    if not isinstance(instance, dict):
        return instance
    for key, subschema in schema.get("properties", {}).items():
        if key not in instance and "default" in subschema:
            instance[key] = copy.deepcopy(subschema["default"])
        if key in instance and subschema.get("type") == "object":
            fill_defaults(subschema, instance[key])
    return instance


def _key_path(error):
    return ".".join(str(part) for part in error.absolute_path) or "<top level>"


def _schema_at(schema, path):
    """The subschema describing the key at `path` (following properties only)."""
    node = schema
    for part in path:
        node = node.get("properties", {}).get(part, {})
    return node


def _origin(path, overrides, preset_file):
    node = overrides
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return f"from {preset_file}"
        node = node[part]
    return "from config/config.yaml, --configfile or --config"


def _closest_alternative(error):
    """The first error of the oneOf alternative whose keys fit the value best (fewest unknown-key errors)."""
    by_branch = {}
    for sub in error.context:
        by_branch.setdefault(sub.relative_schema_path[0], []).append(sub)
    branch = min(by_branch, key=lambda b: sum(e.validator == "additionalProperties" for e in by_branch[b]))
    return by_branch[branch][0]


def describe_error(error, schema, overrides, preset_file):
    """One readable line for a jsonschema error: key, origin, what is allowed, how to fix it."""
    path = list(error.absolute_path)
    key = _key_path(error)
    where = _origin(path, overrides, preset_file)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        parent = key if path else "the top level"
        unknown = sorted(set(error.instance) - set(allowed))
        return (
            f"unknown config key {', '.join(repr(u) for u in unknown)} in {parent} ({where}); "
            f"allowed keys there: {', '.join(allowed)}. Check the spelling."
        )
    description = _schema_at(schema, path).get("description", "")
    hint = f" ({description.strip()})" if description else ""
    if error.validator == "type":
        expected = error.validator_value
        return f"config key '{key}' = {error.instance!r} ({where}) must be of type {expected}{hint}"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bound = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[error.validator]
        return f"config key '{key}' = {error.instance!r} ({where}) must be {bound} {error.validator_value}{hint}"
    if error.validator == "enum":
        options = ", ".join(repr(value) for value in error.validator_value)
        return f"config key '{key}' = {error.instance!r} ({where}) must be one of {options}{hint}"
    if error.validator == "required":
        return f"config is missing the key {error.message.split()[0]} in {key}{hint}"
    if error.validator == "oneOf" and error.context:
        # Report the problem within the alternative that came closest (e.g. a negative 'stop' in a range).
        closest = _closest_alternative(error)
        return describe_error(closest, schema, overrides, preset_file) + (
            " (a subset is either a range {start, stop, step} or seeded subsets {n, seeds})")
    if error.validator == "oneOf":
        return (
            f"config key '{key}' = {error.instance!r} ({where}) must be either a range "
            "{start, stop, step} or seeded subsets {n, seeds}" + hint
        )
    return f"config key '{key}' ({where}): {error.message}{hint}"


def validate(instance, schema, overrides=None, preset_file="the preset"):
    """Raise ConfigError listing every schema violation, one line each."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [describe_error(error, schema, overrides or {}, preset_file) for error in errors]
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(lines))


def check_paths(config):
    """Paths the user named explicitly must exist (ImageNet's folder is checked when its data job runs,
    so that `snakemake -n --config preset=imagenet` works on a machine without it)."""
    tarball = config["datasets"]["cifar10"]["tarball"]
    if tarball is not None and not Path(tarball).is_file():
        raise ConfigError(
            f"config key 'datasets.cifar10.tarball' = {tarball!r}: no such file. Point it at a copy of "
            "cifar-10-python.tar.gz, or set it to null to download the tarball."
        )


def check_consistency(config, registry):
    """Rules that span several keys (the schema checks each key alone)."""
    densepure = config["densepure"]
    too_many = [k for k in densepure["vote_ablation"] if k > densepure["votes"]]
    if too_many:
        raise ConfigError(
            f"config key 'densepure.vote_ablation' has {too_many}, more than 'densepure.votes' = {densepure['votes']} "
            "reverse runs are stored; raise 'votes' or drop those entries"
        )
    models = config["models"]
    for key, source in (("models.diffusion.source", models["diffusion"]["source"]),
                        ("models.classifier.source", models["classifier"]["source"]),
                        ("models.multihead.init", models["multihead"]["init"])):
        if source not in ("train", "diffusion") and source not in registry:
            raise ConfigError(
                f"config key '{key}' = {source!r} is neither 'train' nor a checkpoint of config/checkpoints.yaml "
                f"({', '.join(sorted(registry))})"
            )
        if source in registry and source not in config["checkpoints"]:
            raise ConfigError(f"config key '{key}' = {source!r}: add it to the preset's 'checkpoints' list too")


def load_config(snakemake_config, presets_dir=PRESETS_DIR, schema_path=CONFIG_SCHEMA):
    """Merge the chosen preset with Snakemake's config, fill defaults, validate; return a plain dict."""
    overrides = dict(snakemake_config or {})
    preset = overrides.get("preset")
    presets = available_presets(presets_dir)
    if not isinstance(preset, str) or preset not in presets:
        raise ConfigError(
            f"unknown preset {preset!r}; available presets: {', '.join(presets)} "
            f"(files in {Path(presets_dir).relative_to(REPO_ROOT) if Path(presets_dir).is_relative_to(REPO_ROOT) else presets_dir}). "
            "Choose one with --config preset=NAME or in config/config.yaml."
        )
    preset_file = Path(presets_dir) / f"{preset}.yaml"
    preset_values = read_yaml(preset_file) or {}
    if not isinstance(preset_values, dict):
        raise ConfigError(f"{preset_file}: must be a mapping of config keys")
    merged = deep_merge(preset_values, overrides)
    merged["preset"] = preset
    schema = read_yaml(schema_path)
    validate(merged, schema, overrides, preset_file=f"config/presets/{preset}.yaml")
    fill_defaults(schema, merged)
    validate(merged, schema, overrides, preset_file=f"config/presets/{preset}.yaml")
    check_paths(merged)
    registry = load_checkpoint_registry()
    check_consistency(merged, registry)
    unknown = [name for name in merged["checkpoints"] if name not in registry]
    if unknown:
        raise ConfigError(
            f"config key 'checkpoints' names {', '.join(map(repr, unknown))}, which config/checkpoints.yaml does not "
            f"define; known checkpoints: {', '.join(sorted(registry))}"
        )
    return merged


def load_checkpoint_registry(path=CHECKPOINTS_REGISTRY, schema_path=CHECKPOINTS_SCHEMA):
    """The checkpoint registry, validated against its schema."""
    registry = read_yaml(path) or {}
    schema = read_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(registry))
    if errors:
        lines = [f"'{_key_path(error)}': {error.message}" for error in errors]
        raise ConfigError(f"{path} is invalid:\n  - " + "\n  - ".join(lines))
    return registry


def checkpoint_files(registry, names):
    """(name, file entry) for every file of the named checkpoints, in registry order."""
    return [(name, entry) for name in names for entry in registry[name]["files"]]
