"""Configuration: layered sources merged, typed, defaults filled, validated; errors name the key and its source.

Sources, lowest priority first: `config/presets/<preset>.yaml`, `config/config.yaml` (the Snakefile's `configfile:`),
every `--configfile` in the order given, `--config`. Mappings merge key by key; lists and scalars replace. Values from
files are taken as YAML read them. Values of `--config` are text (Snakemake reads a nested `--config` value with
YAML's BaseLoader, which types nothing) and are read here as YAML would read them, guided by the schema: a key that
takes a string keeps the text as written (`val_dir: /data/2012`, `attention_resolutions: 8`).

Then, before any job runs: whole floats where the schema says integer become integers (`n: 6.0e+1` -> 60, reported
as a note), the schema is checked (every block is closed; what one block needs, e.g. an eot_pgd attack's steps, is an
if/then there), stage seeds follow the global seed, the evaluation subsets are checked against the split sizes, named
files must exist, the rules between keys of what the DAG will plan are checked (`plan_problems`: reserved attack
names, budgets, sigma ranges, Pixel is a Barrier's models and claims), and the networks the DAG trains are built on
PyTorch's meta device. Every error names the key, the source its value came from, what is allowed and how to fix it.
"""

import copy
import difflib
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml

from diffrobust.errors import DiffrobustError

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = REPO_ROOT / "config" / "presets"
CONFIG_SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
CHECKPOINTS_REGISTRY = REPO_ROOT / "config" / "checkpoints.yaml"
# Names another registry file in place of config/checkpoints.yaml, for every reader in the process and the jobs it
# starts: `diffrobust rehearse` sets it to its scratch copy, whose reduced networks carry their smaller architecture.
CHECKPOINTS_REGISTRY_VARIABLE = "DIFFROBUST_CHECKPOINTS"
CHECKPOINTS_SCHEMA = REPO_ROOT / "workflow" / "schemas" / "checkpoints.schema.yaml"

# Stage seeds that follow the global `seed` unless the config sets them (the schema gives them no default).
STAGE_SEEDS = (("densepure", "seed"), ("diffpure", "seed"), ("rdc", "seed"), ("pixel_barrier", "seed"))
MNIST_CLASSES = 10

log = logging.getLogger(__name__)


class ConfigError(DiffrobustError, ValueError):
    """A configuration problem, with a message meant for the person running the workflow."""


@dataclass(frozen=True)
class ConfigSource:
    """One layer of config: the name the user knows it by (a file path, `--config`) and its values.

    `as_text`: the values are text to be read as YAML (Snakemake's `--config`), not values a YAML file gave."""

    name: str
    values: dict
    as_text: bool = False


@dataclass(frozen=True)
class ResolvedConfig:
    """The merged, validated config and the notes worth printing (values converted on the way)."""

    config: dict
    notes: list = field(default_factory=list)


# libyaml's safe loader where PyYAML was built with it: it reads the config schema in a tenth of the pure-Python
# loader's time, and a job reads the schema, the presets and the registry at start-up. Same safe subset of YAML.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text):
    """YAML text (or a stream) as yaml.safe_load reads it, with libyaml's loader where available."""
    return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 -- a safe loader


@functools.lru_cache(maxsize=32)
def _parsed_yaml(text):
    """parse_yaml of `text`, shared: callers get deep copies (read_yaml)."""
    return parse_yaml(text)


def read_yaml(path):
    """Parse a YAML file; a syntax error names the file and line. Repeated reads of an unchanged file (the config
    schema, read by each argument check of a job) parse once: the cache is keyed by the file's text, so an edited
    file is read afresh, and each call gets its own deep copy to change as it likes."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    try:
        return copy.deepcopy(_parsed_yaml(text))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def display_path(path):
    """A path as the user would write it: relative to the working folder when inside it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_source(path):
    """A config file as a ConfigSource; it must hold a mapping of config keys."""
    values = read_yaml(path)
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{display_path(path)}: must be a mapping of config keys, got {type(values).__name__}")
    return ConfigSource(display_path(path), dict(values))


def workflow_sources(directive_configfiles, cli_configfiles, cli_config, replace_workflow_config=False):
    """The sources Snakemake merged into its `config`, lowest priority first: the Snakefile's `configfile:` files
    (dropped by --replace-workflow-config), each --configfile, then --config (as text to be read as YAML)."""
    sources = [] if replace_workflow_config else [read_source(path) for path in directive_configfiles]
    sources += [read_source(path) for path in cli_configfiles]
    if cli_config:
        sources.append(ConfigSource("--config", _plain(cli_config), as_text=True))
    return sources


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


def complete_architectures(config, schema):
    """An architecture block without `family` is completed from the schema's default network, so that
    `architecture: {config: {depth: 14}}` changes one key of the default network also where the preset does not
    spell the block out (where it does, the override merges into the preset's block). A block that names its
    family is taken as written (the builder's defaults fill the rest)."""
    for role in ("diffusion", "classifier"):
        model = config.get("models", {}).get(role) if isinstance(config.get("models"), dict) else None
        block = model.get("architecture") if isinstance(model, dict) else None
        if isinstance(block, dict) and "family" not in block:
            default = schema["properties"]["models"]["properties"][role]["properties"]["architecture"]["default"]
            config["models"][role]["architecture"] = deep_merge(default, block)
    return config


def resolve_stage_seeds(config):
    """A stage seed the config leaves unset takes the global seed (what the schema promises)."""
    for block, key in STAGE_SEEDS:
        config[block].setdefault(key, config["seed"])
    return config


# --- the schema as a map of keys -----------------------------------------------------------------------------------


def _alternatives(node, root):
    """The concrete schemas `node` stands for: `$ref` followed (its siblings kept), oneOf/anyOf expanded."""
    if "$ref" in node:
        target = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return _alternatives({**target, **{k: v for k, v in node.items() if k != "$ref"}}, root)
    for keyword in ("oneOf", "anyOf"):
        if keyword in node:
            return [alternative for option in node[keyword] for alternative in _alternatives(option, root)]
    return [node]


def schemas_at(schema, path):
    """Every schema that can describe the key at `path` (strings for mapping keys, ints for list items)."""
    nodes = _alternatives(schema, schema)
    for part in path:
        children = []
        for node in nodes:
            child = node.get("items") if isinstance(part, int) else node.get("properties", {}).get(part)
            if child is not None:
                children += _alternatives(child, schema)
        nodes = children
    return nodes


def _types_of(nodes):
    """JSON types the schemas allow (from `type`, else from `enum`); None when unknown (any type)."""
    if not nodes:
        return None
    types = set()
    for node in nodes:
        if "type" in node:
            types |= {node["type"]} if isinstance(node["type"], str) else set(node["type"])
        elif "enum" in node:
            types |= {_json_type(value) for value in node["enum"]}
        else:
            return None
    return types


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _fits(value, types):
    """Whether `value` has one of the JSON `types` (a whole float counts as an integer, as jsonschema counts it)."""
    if types is None:
        return True
    kind = _json_type(value)
    return (kind in types or (kind == "integer" and "number" in types)
            or (kind == "number" and "integer" in types and value.is_integer()))


def _plain(value):
    """Plain dicts and lists (Snakemake may hand over immutable mappings)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def read_text_values(values, schema, path=()):
    """`--config` values read as a YAML document would read them, wherever they sit in the tree.

    Nested values arrive from Snakemake as text ('5', '[0.3]' items, 'null'); each is read with YAML. Where the
    schema takes a string and YAML's reading does not fit the schema, the text stays as written ('/data/2012',
    '8' for attention_resolutions, 'no' for a name). A top-level value Snakemake already typed (`seed=3` -> 3) is
    kept, or turned back into text where the schema takes only a string (`description=2012`)."""
    if isinstance(values, Mapping):
        return {key: read_text_values(item, schema, (*path, key)) for key, item in values.items()}
    if isinstance(values, list):
        return [read_text_values(item, schema, (*path, index)) for index, item in enumerate(values)]
    types = _types_of(schemas_at(schema, path))
    if isinstance(values, str):
        try:
            value = parse_yaml(values)
        except yaml.YAMLError:
            return values
        if _fits(value, types) or types is None or "string" not in types:
            return value
        return values
    if types == {"string"} and values is not None:
        return str(values)
    return values


# --- where a value came from ---------------------------------------------------------------------------------------


def _holds(values, path):
    node = values
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    return True


class Origins:
    """Which source gave the value at a key: the highest-priority source that holds the key. Lists replace whole,
    so a list item comes from the source that gave the list."""

    def __init__(self, sources):
        self.sources = list(sources)  # lowest priority first

    def name(self, path):
        for source in reversed(self.sources):
            if _holds(source.values, list(path)):
                return source.name
        return "the schema default"

    def of(self, path):
        return f"from {self.name(path)}"


def dotted(path):
    return ".".join(str(part) for part in path) or "<top level>"


# --- numbers -------------------------------------------------------------------------------------------------------


def normalise_numbers(config, schema, origins):
    """Whole floats where the schema says integer become ints (in place); floats must be finite.

    jsonschema counts 60.0 as an integer, but torch and range() do not ('randn() received an invalid combination of
    arguments'), so the jobs must get 60. Returns (notes on the conversions, problems)."""
    notes, problems = [], []

    def visit(value, path):
        if isinstance(value, dict):
            for key in value:
                value[key] = visit(value[key], (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                value[index] = visit(item, (*path, index))
        elif isinstance(value, float):
            types = _types_of(schemas_at(schema, path))
            if not math.isfinite(value):
                problems.append(f"config key '{dotted(path)}' = {value} ({origins.of(path)}) must be a finite number")
            elif value.is_integer() and types and "integer" in types and "number" not in types:
                notes.append(f"config key '{dotted(path)}' = {value!r} ({origins.of(path)}) is a whole number: "
                             f"read as the integer {int(value)}")
                return int(value)
        return value

    visit(config, ())
    return notes, problems


# --- schema errors -------------------------------------------------------------------------------------------------


def _closest_alternative(error):
    """The first error of the oneOf alternative whose keys fit the value best (fewest unknown-key errors)."""
    by_branch = {}
    for sub in error.context:
        by_branch.setdefault(sub.relative_schema_path[0], []).append(sub)
    branch = min(by_branch, key=lambda b: sum(e.validator == "additionalProperties" for e in by_branch[b]))
    return by_branch[branch][0]


def _description(schema, path):
    """The schema's description of the key; for a list item without one, the list's."""
    for node in schemas_at(schema, path):
        if node.get("description"):
            return node["description"].strip()
    return _description(schema, path[:-1]) if path and isinstance(path[-1], int) else ""


def _number_as_text_hint(error):
    """YAML 1.1 reads 1e5 (no dot, no sign in the exponent) as text; say how to write the number."""
    value = error.instance
    if not isinstance(value, str) or not set(error.validator_value if isinstance(error.validator_value, list)
                                             else [error.validator_value]) & {"integer", "number"}:
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    written = str(int(number)) if number.is_integer() else repr(number)
    return f"; YAML reads {value!r} as text: write {written} (a float needs a dot and a signed exponent, 1.0e+5)"


def describe_error(error, schema, origins):
    """Readable lines for a jsonschema error: the full key, its source, what is allowed, how to fix it."""
    path = list(error.absolute_path)
    key = dotted(path)
    where = origins.of(path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        parent = key if path else "the top level"
        lines = []
        for unknown in sorted(set(error.instance) - set(allowed)):
            close = difflib.get_close_matches(unknown, allowed, n=1)
            suggestion = f"did you mean '{close[0]}'? " if close else ""
            lines.append(
                f"unknown config key '{dotted([*path, unknown])}' in {parent} ({origins.of([*path, unknown])}); "
                f"{suggestion}allowed keys there: {', '.join(allowed)}. Check the spelling.")
        return "\n  - ".join(lines)
    description = _description(schema, path)
    hint = f" ({description})" if description else ""
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return (f"config key '{key}' = {error.instance!r} ({where}) must be of type {expected}"
                f"{_number_as_text_hint(error)}{hint}")
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bound = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[error.validator]
        return f"config key '{key}' = {error.instance!r} ({where}) must be {bound} {error.validator_value}{hint}"
    if error.validator == "enum":
        options = ", ".join(repr(value) for value in error.validator_value)
        close = difflib.get_close_matches(error.instance, [str(v) for v in error.validator_value], n=1) \
            if isinstance(error.instance, str) else []
        suggestion = f"; did you mean {close[0]!r}?" if close else ""
        return f"config key '{key}' = {error.instance!r} ({where}) must be one of {options}{suggestion}{hint}"
    if error.validator == "required":
        return describe_missing_keys(key, [error], where, hint)
    if "propertyNames" in error.relative_schema_path:
        # a user-chosen name of a map (an attack's name): the key is the name itself
        name = error.instance
        return (f"config key '{dotted([*path, name])}' ({origins.of([*path, name])}): the name {name!r} is not "
                f"allowed: {error.schema.get('description', error.message).strip()} (the pattern "
                f"{error.schema.get('pattern', '')})")
    if error.validator == "contains" and "const" in error.validator_value:
        return (f"config key '{key}' = {error.instance!r} ({where}) must include {error.validator_value['const']!r}"
                f"{hint}")
    if error.validator == "minItems":
        return f"config key '{key}' = {error.instance!r} ({where}) must list at least {error.validator_value}{hint}"
    if error.validator == "uniqueItems":
        return f"config key '{key}' = {error.instance!r} ({where}) names a value twice: drop the repeat{hint}"
    if error.validator == "oneOf" and error.context:
        # Report the problem within the alternative that came closest (e.g. a negative 'stop' in a range).
        closest = _closest_alternative(error)
        return describe_error(closest, schema, origins) + (
            " (a subset is either a range {start, stop, step} or seeded subsets {n, seeds})")
    if error.validator == "oneOf":
        return (
            f"config key '{key}' = {error.instance!r} ({where}) must be either a range "
            "{start, stop, step} or seeded subsets {n, seeds}" + hint
        )
    return f"config key '{key}' = {error.instance!r} ({where}): {error.message}{hint}"


def describe_missing_keys(key, errors, where, hint):
    """One line for the keys a block lacks (`errors`: the `required` errors of one block and one rule); the fix is
    the description of the rule that requires them (an if/then of the schema), else the block's."""
    missing = ", ".join(repr(name) for name in errors[0].validator_value if name not in errors[0].instance)
    fix = errors[0].schema.get("description", "").strip()
    block = f"config key '{key}'" if key != dotted([]) else "the config"
    return f"{block} ({where}) lacks {missing}" + (f": {fix}" if fix else hint)


def schema_problems(instance, schema, origins):
    """One readable line per schema violation (sorted by key); the keys one rule requires of one block share a
    line (an eot_pgd attack without its four settings is one problem)."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    required, lines = {}, []
    for error in errors:
        if error.validator == "required":
            group = (tuple(error.absolute_path), tuple(map(str, error.relative_schema_path)))
            if group not in required:
                required[group] = []
                lines.append(group)
            required[group].append(error)
        else:
            lines.append(error)
    return [describe_error(line, schema, origins) if not isinstance(line, tuple)
            else _describe_required(required[line], schema, origins) for line in lines]


def _describe_required(errors, schema, origins):
    path = list(errors[0].absolute_path)
    description = _description(schema, path)
    return describe_missing_keys(dotted(path), errors, origins.of(path), f" ({description})" if description else "")


def raise_problems(problems):
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def validate(instance, schema, origins=None):
    """Raise ConfigError listing every schema violation, one line each."""
    raise_problems(schema_problems(instance, schema, origins or Origins([])))


# --- checks that need more than one key ----------------------------------------------------------------------------


def eval_split_size(config):
    """Images in the evaluation split that the `subsets` index, as the data stage prepares it: MNIST's test split
    holds MNIST_CLASSES x datasets.mnist.test_per_class images; CIFAR-10's test split and ImageNet's validation set
    have their official sizes (an ImageNet folder with fewer images is refused when its data job runs)."""
    from diffrobust.data import EVAL_SPLIT_SIZE

    if config["dataset"] == "mnist":
        return MNIST_CLASSES * config["datasets"]["mnist"]["test_per_class"]
    return EVAL_SPLIT_SIZE[config["dataset"]]


def _split_size_origin(config, origins):
    if config["dataset"] == "mnist":
        per_class = config["datasets"]["mnist"]["test_per_class"]
        return (f"the mnist test split holds {MNIST_CLASSES} classes x datasets.mnist.test_per_class = {per_class} "
                f"({origins.of(['datasets', 'mnist', 'test_per_class'])}) = {eval_split_size(config)} images")
    return f"the {config['dataset']} evaluation split holds {eval_split_size(config)} images"


def subset_problems(config, origins):
    """Every subset must fit the evaluation split (checked now, not in a report job after the models trained)."""
    from diffrobust.data import DataError, subset_indices

    size, problems = eval_split_size(config), []
    for name, spec in config["subsets"].items():
        try:
            subset_indices(spec, size, name)
        except DataError as error:
            culprit = ["subsets", name, "n" if "seeds" in spec else "stop"]
            problems.append(f"{error} ({origins.of(culprit)}; {_split_size_origin(config, origins)})")
    return problems


def dataset_shape(config):
    """(image channels, image size, classes) of the prepared dataset, from the config alone."""
    dataset = config["dataset"]
    if dataset == "mnist":
        return 1, config["datasets"]["mnist"]["pad_to"], MNIST_CLASSES
    if dataset == "cifar10":
        return 3, 32, 10
    return 3, config["datasets"]["imagenet"]["image_size"], 1000


# The code a meta-device build runs: a change to any of these files invalidates the architectures checked before.
BUILDER_SOURCES = ("models.py", "training.py", "networks")


def builder_digest():
    """sha256 over the source files of the network builders (a few hundred kB of text; no import)."""
    package = Path(__file__).resolve().parent
    files = []
    for name in BUILDER_SOURCES:
        target = package / name
        files += sorted(target.glob("*.py")) if target.is_dir() else [target]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _checked_architectures(path):
    try:
        return set(json.loads(Path(path).read_text())["checked"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _write_checked_architectures(path, keys):
    """The file of checked architectures, holding `keys` (written whole to a temporary file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"checked": sorted(keys)}, indent=0))
    os.replace(temporary, path)


def architecture_problems(config, origins, checked=None):
    """Build every network the DAG trains, with the keys the dataset fills in, on PyTorch's meta device (no memory):
    what the family's builder refuses (depth 6n+2, an attention resolution that no level has, a patch size that does
    not divide the image) stops the DAG build instead of the training job.

    `checked`: a JSON file that remembers the architectures built here without a problem, keyed by the architecture,
    the data's shape and `builder_digest()`; those are not built again, so an unchanged config costs no torch import
    and a no-op run or a dry run stays fast."""
    models = config["models"]
    # the adversarial baseline trains the classifier's architecture
    trained = {role: models[role]["source"] == "train" for role in ("diffusion", "classifier")}
    trained["classifier"] = trained["classifier"] or models["adversarial"]["source"] == "train"
    roles = [role for role in ("diffusion", "classifier") if trained[role]]
    if not roles:
        return []
    shape = dataset_shape(config)
    keys = {}
    if checked is not None:
        code = builder_digest()
        known = _checked_architectures(checked)
        for role in roles:
            identity = json.dumps([role, models[role]["architecture"], shape, code], sort_keys=True, default=str)
            keys[role] = hashlib.sha256(identity.encode()).hexdigest()
        roles = [role for role in roles if keys[role] not in known]
        if not roles:
            return []
    import torch

    from diffrobust.models import build_architecture
    from diffrobust.training import conditional_unet_architecture

    channels, size, classes = shape
    problems, built = [], []
    for role in roles:
        architecture = models[role]["architecture"]
        try:
            if role == "diffusion":
                architecture = conditional_unet_architecture(architecture, channels, size, classes)
            else:  # as train_classifier fills a small_resnet block
                architecture = {"family": architecture["family"],
                                "config": {"in_channels": channels, "num_classes": classes,
                                           **architecture.get("config", {})}}
            with torch.device("meta"):
                build_architecture(architecture)
        except (ValueError, TypeError, KeyError) as error:
            path = ["models", role, "architecture"]
            problems.append(f"config key '{dotted(path)}' ({origins.of(path)}): the {architecture.get('family')} "
                            f"builder refuses it for the {config['dataset']} data ({channels} x {size} x {size}, "
                            f"{classes} classes): {error}")
        else:
            built.append(role)
    if checked is not None and built:
        _write_checked_architectures(checked, known | {keys[role] for role in built})
    return problems


# Files the user may name, with what to do when one is not there (ImageNet's folder is checked when its data job
# runs, so that `snakemake -n --config preset=imagenet` works on a machine without it).
NAMED_FILES = (
    (("datasets", "cifar10", "tarball"),
     "Point it at a copy of cifar-10-python.tar.gz, or set it to null to download the tarball."),
    (("pixel_barrier", "target", "file"),
     "Point it at Mist's target image (a PNG; relative paths start at the workflow folder), or set it to null for "
     "the checkerboard of pixel_barrier.target.period, or to null with pixel_barrier.target.checkpoint naming a "
     "registry image (diff_protect_mist_target, downloaded by the DAG)."),
)


def check_paths(config, origins=None):
    """Files the user named explicitly must exist now, not when the first job that reads them runs."""
    origins = origins or Origins([])
    problems = []
    for path, fix in NAMED_FILES:
        value = config
        for part in path:
            value = value[part]
        if value is not None and not Path(value).is_file():
            problems.append(f"config key '{dotted(path)}' = {value!r} ({origins.of(path)}): no such file. {fix}")
    if problems:
        raise ConfigError("\n".join(problems))


def check_consistency(config, registry, origins=None):
    """Rules that span several keys (the schema checks each key alone)."""
    origins = origins or Origins([])
    densepure = config["densepure"]
    too_many = [k for k in densepure["vote_ablation"] if k > densepure["votes"]]
    if too_many:
        raise ConfigError(
            f"config key 'densepure.vote_ablation' ({origins.of(['densepure', 'vote_ablation'])}) has {too_many}, "
            f"more than 'densepure.votes' = {densepure['votes']} ({origins.of(['densepure', 'votes'])}) "
            "reverse runs are stored; raise 'votes' or drop those entries"
        )
    diffpure = config["diffpure"]
    if diffpure["checks"]["attack"] not in diffpure["attacks"]:
        raise ConfigError(
            f"config key 'diffpure.checks.attack' = {diffpure['checks']['attack']!r} "
            f"({origins.of(['diffpure', 'checks', 'attack'])}) is not an attack of 'diffpure.attacks' "
            f"({', '.join(diffpure['attacks'])}); name one of them")
    rdc = config["rdc"]
    if rdc["checks"]["attack"] not in rdc["attacks"]:
        raise ConfigError(
            f"config key 'rdc.checks.attack' = {rdc['checks']['attack']!r} ({origins.of(['rdc', 'checks', 'attack'])}) "
            f"is not an attack of 'rdc.attacks' ({', '.join(rdc['attacks'])}); name one of them")
    shared = sorted(set(rdc["attacks"]) & set(diffpure["attacks"]))
    if shared:
        raise ConfigError(
            f"config keys 'rdc.attacks' and 'diffpure.attacks' both name {', '.join(shared)} "
            f"({origins.of(['rdc', 'attacks'])}): an attack's sets live under its name, so each stage needs its own "
            "names; rename one of them")
    if "rdc" not in rdc["defenses"]:
        raise ConfigError(f"config key 'rdc.defenses' ({origins.of(['rdc', 'defenses'])}) must include rdc "
                          "(the masking checks run on it)")
    model_keys = [(["models", "diffusion", "source"], config["models"]["diffusion"]["source"]),
                  (["models", "classifier", "source"], config["models"]["classifier"]["source"]),
                  (["models", "multihead", "init"], config["models"]["multihead"]["init"]),
                  (["diffpure", "models", "diffusion"], diffpure["models"]["diffusion"]),
                  (["diffpure", "models", "classifier"], diffpure["models"]["classifier"]),
                  (["models", "adversarial", "source"], config["models"]["adversarial"]["source"])]
    model_keys += rdc_model_keys(rdc, origins)
    for path, source in model_keys:
        key = dotted(path)
        if source is None:  # only models.adversarial.source may be null: the preset has no such model
            continue
        if source not in ("train", "diffusion") and source not in registry:
            raise ConfigError(
                f"config key '{key}' = {source!r} ({origins.of(path)}) is neither 'train' nor a checkpoint of "
                f"config/checkpoints.yaml ({', '.join(sorted(registry))})"
            )
        if source in registry and source not in config["checkpoints"]:
            raise ConfigError(f"config key '{key}' = {source!r} ({origins.of(path)}): add it to the preset's "
                              "'checkpoints' list too")
    check_adversarial_source(config, origins)
    unknown = [name for name in config["checkpoints"] if name not in registry]
    if unknown:
        raise ConfigError(
            f"config key 'checkpoints' ({origins.of(['checkpoints'])}) names {', '.join(map(repr, unknown))}, which "
            f"config/checkpoints.yaml does not define; known checkpoints: {', '.join(sorted(registry))}"
        )


def rdc_model_keys(rdc, origins):
    """(key path, source) of every model the rdc block names; a role with one source per threat model
    ({linf: ..., l2: ...}) must name one for every threat of rdc.threats."""
    keys = []
    for role, source in rdc["models"].items():
        path = ["rdc", "models", role]
        if not isinstance(source, dict):
            keys.append((path, source))
            continue
        missing = [threat for threat in rdc["threats"] if threat not in source]
        if missing:
            raise ConfigError(f"config key '{dotted(path)}' ({origins.of(path)}) names a source per threat model but "
                              f"none for {', '.join(missing)} (rdc.threats: {', '.join(rdc['threats'])}); add it")
        keys += [([*path, threat], each) for threat, each in source.items()]
    return keys


# Datasets on which the DAG trains the adversarial baseline itself (models.adversarial.source: train).
ADVERSARIAL_TRAINING_DATASETS = ("mnist",)


def check_adversarial_source(config, origins=None):
    """PGD adversarial training inside the DAG is the mini baseline; at paper scale RDC compares with RobustBench's
    published checkpoints (one per threat model, named in rdc.models.adversarial), so training is refused there
    rather than quietly standing in for them."""
    origins = origins or Origins([])
    path = ["models", "adversarial", "source"]
    if config["models"]["adversarial"]["source"] == "train" and config["dataset"] not in ADVERSARIAL_TRAINING_DATASETS:
        raise ConfigError(
            f"config key '{dotted(path)}' = 'train' ({origins.of(path)}): the DAG trains the adversarial baseline "
            f"only on {', '.join(ADVERSARIAL_TRAINING_DATASETS)} (PGD training of the small mini classifier), not on "
            f"{config['dataset']}. RDC's paper-scale baselines (CIFAR-10) are RobustBench's Wang2023Better_WRN-70-16 "
            "and Rebuffi2021Fixing_70_16_cutmix_ddpm checkpoints, one per threat model: name them in "
            "'rdc.models.adversarial' ({linf: robustbench_cifar10_linf_wang2023better_wrn70_16, l2: "
            "robustbench_cifar10_l2_wang2023better_wrn70_16}, as the cifar10 preset does) and leave this key unset "
            "(null: no adversarially trained model of the DAG's own) or name a classifier checkpoint of "
            "config/checkpoints.yaml.")


# --- checks of what the DAG will plan: rules between keys that the schema cannot relate -----------------------------


# suffixes of the two attacks derived for the gradient-masking checks: more iterations, a larger budget
MORE, LARGE = "-more", "-large"
DERIVED_SUFFIXES = (MORE, LARGE)
# what an attack's name may hold: it is a folder of the results and the `attack` wildcard of workflow/rules/attacks.smk
# (whose constraint is this pattern; the config schema's `propertyNames` of the attack maps says the same)
ATTACK_NAME_PATTERN = "[A-Za-z0-9_-]+"


def reserved_suffix(name):
    """The suffix of a derived check (-more, -large) that `name` ends in, or None. Such names belong to the checks
    (attack_names derives them, and the jobs read '<base>-more' as <base> with more iterations), so a configured
    attack may not take one: it would be planned twice and run as the check."""
    return next((suffix for suffix in DERIVED_SUFFIXES if name.endswith(suffix)), None)


def base_attack(name):
    """The configured attack a derived check is made of ('rand-more' -> 'rand'); `name` itself for any other."""
    suffix = reserved_suffix(name)
    return name[: -len(suffix)] if suffix else name


def attack_name_problems(config, origins):
    """A configured attack may not take a name the masking checks derive ('<checks.attack>-more', and so any name
    ending in -more or -large, which the jobs read as a derived check of the part before the suffix)."""
    problems = []
    for stage in ("diffpure", "rdc"):
        check = config[stage]["checks"]["attack"]
        for name in config[stage]["attacks"]:
            suffix = reserved_suffix(name)
            if suffix:
                path = [stage, "attacks", name]
                problems.append(
                    f"config key '{dotted(path)}' ({origins.of(path)}): attack names ending in "
                    f"{' or '.join(DERIVED_SUFFIXES)} are reserved for the masking checks derived from "
                    f"'{stage}.checks.attack' (now {check!r}: {check}{MORE}, {check}{LARGE}); rename the "
                    f"attack (e.g. {name[:-len(suffix)]}_{suffix[1:]})")
    return problems


def budget_problems(config, origins):
    """The large budget of the masking check must exceed the threat's budget (else the check is no check)."""
    problems = []
    for stage in ("diffpure", "rdc"):
        for threat, budget in config[stage]["threats"].items():
            if budget["large_eps"] <= budget["eps"]:
                path, eps_path = [stage, "threats", threat, "large_eps"], [stage, "threats", threat, "eps"]
                problems.append(
                    f"config key '{dotted(path)}' = {budget['large_eps']} ({origins.of(path)}) must be larger than "
                    f"'{dotted(eps_path)}' = {budget['eps']} ({origins.of(eps_path)}): the large-budget check must "
                    "drive the defense to about 0%; raise large_eps")
    return problems


def chain_levels(config, role):
    """Levels of the diffusion chain the RDC role (conditional, multihead) runs on, where the config says it: the
    DAG's own models have models.diffusion.num_timesteps; None for a checkpoint (its job checks the indices)."""
    source = config["rdc"]["models"][role]
    own = source == "train" and (role != "multihead" or config["models"]["multihead"]["init"] == "diffusion")
    return config["models"]["diffusion"]["num_timesteps"] if own else None


def diffusion_classifier_problems(config, origins):
    """RDC's diffusion classifiers and LM: sigma ranges the right way round, vp table indices inside the chain."""
    problems = []
    for block, role, strict in (("dc", "conditional", True), ("multihead_dc", "multihead", True), ("lm", None, False)):
        settings = config["rdc"][block]
        low, high = settings["sigma_min"], settings["sigma_max"]
        if low > high or (strict and low == high):
            low_path, high_path = ["rdc", block, "sigma_min"], ["rdc", block, "sigma_max"]
            problems.append(
                f"config key '{dotted(low_path)}' = {low} ({origins.of(low_path)}) must be "
                f"{'below' if strict else 'at most'} '{dotted(high_path)}' = {high} ({origins.of(high_path)}): "
                f"{'the edm grid runs' if strict else 'LM draws its noise levels'} from sigma_min to sigma_max; "
                "swap them or change one")
        levels = chain_levels(config, role) if role else None
        outside = [t for t in settings.get("timesteps") or [] if levels is not None and t >= levels]
        if outside:
            path, steps_path = ["rdc", block, "timesteps"], ["models", "diffusion", "num_timesteps"]
            problems.append(
                f"config key '{dotted(path)}' ({origins.of(path)}) has {outside}, outside the chain of "
                f"'{dotted(steps_path)}' = {levels} levels ({origins.of(steps_path)}): the indices run from 0 to "
                f"{levels - 1}; drop or lower them")
    return problems


# Families of config/checkpoints.yaml and the kind of model each is: diffrobust.models.REGISTRY_KINDS, spelled here
# without torch so that the DAG build can check what a checkpoint is (tests/test_config.py holds the two equal).
REGISTRY_FAMILY_KINDS = {
    "improved_diffusion_unet": "diffusion", "guided_diffusion_unet": "diffusion", "edm_vp_songunet": "diffusion",
    "score_sde_ncsnpp": "diffusion", "robustbench_wrn": "classifier", "robustbench_dm_wrn": "classifier",
    "hf_vit": "classifier", "timm_beit": "classifier", "hf_clip_vision": "features",
    "torchvision_classifier": "classifier", "timm_deit": "classifier",
}
# What each role of pixel_barrier.models reads from a checkpoint: a network of a kind (by its registry family), a
# diffusers folder with the subfolders its loader opens (networks.ldm.SUBFOLDERS, defenses.sdedit.load_if_stage2,
# defenses.upscaling.UPSCALER_FOLDERS), or one weight file read by its own loader (no architecture in the registry).
PIXEL_BARRIER_ROLE_KINDS = {"pixel": "diffusion", "classifier": "classifier", "features": "features"}
PIXEL_BARRIER_ROLE_FOLDERS = {
    "ldm": ("vae", "unet", "scheduler"),
    "if_stage2": ("unet", "scheduler", "image_noising_scheduler"),
    "upscaler": ("vae", "unet", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler"),
}
PIXEL_BARRIER_WEIGHT_FILES = ("lpips", "fid_inception")
# The value of a role that means the DAG's own model instead of a checkpoint
PIXEL_BARRIER_OWN_MODELS = {"ldm": "train", "pixel": "train", "classifier": "train", "features": "classifier"}
# The purifier whose edits the claims read (stages.pixel_barrier.claims)
CLAIMS_PURIFIER = "pdm_pure"
# Purifiers that load a model of their own, by the role of pixel_barrier.models that names it
PURIFIER_MODELS = {"pdm_pure_if": "if_stage2", "noisy_upscaling": "upscaler"}


def checkpoint_fits_role(role, entry):
    """Whether the registry `entry` is what pixel_barrier.models.`role` loads (PIXEL_BARRIER_ROLE_*)."""
    architecture = entry.get("architecture")
    if role in PIXEL_BARRIER_ROLE_KINDS:
        return architecture is not None and REGISTRY_FAMILY_KINDS.get(architecture["family"]) == (
            PIXEL_BARRIER_ROLE_KINDS[role])
    if architecture is not None:
        return False
    if role in PIXEL_BARRIER_ROLE_FOLDERS:
        # the most specific role whose folders it has (the x4 upscaler's folders include an LDM's)
        folders = {file["path"].split("/")[0] for file in entry["files"] if "/" in file["path"]}
        fitting = [name for name, needed in PIXEL_BARRIER_ROLE_FOLDERS.items() if set(needed) <= folders]
        return bool(fitting) and max(fitting, key=lambda name: len(PIXEL_BARRIER_ROLE_FOLDERS[name])) == role
    return (len(entry["files"]) == 1 and "/" not in entry["files"][0]["path"]
            and not entry["files"][0]["path"].lower().endswith(IMAGE_SUFFIXES))


# Registry files that are images (Mist's target), not weights: never a model role's file.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

def pixel_barrier_model_problems(config, registry, origins):
    """Every checkpoint pixel_barrier.models names is in the registry, in the preset's `checkpoints` (else its
    download is queued unannounced) and of the kind its role loads."""
    problems = []
    for role, source in config["pixel_barrier"]["models"].items():
        if source is None or source == PIXEL_BARRIER_OWN_MODELS.get(role):
            continue
        path = ["pixel_barrier", "models", role]
        fitting = sorted(name for name, entry in registry.items() if checkpoint_fits_role(role, entry))
        own = f"{PIXEL_BARRIER_OWN_MODELS[role]!r} (the DAG's own), " if role in PIXEL_BARRIER_OWN_MODELS else ""
        options = f"{own}null (none)" if role not in ("ldm", "pixel") else own.rstrip(", ")
        choices = f"name {options} or one of {', '.join(fitting) or 'none in the registry'}"
        where = f"config key '{dotted(path)}' = {source!r} ({origins.of(path)})"
        if source not in registry:
            problems.append(f"{where} is not a checkpoint of config/checkpoints.yaml: {choices}")
        elif not checkpoint_fits_role(role, registry[source]):
            problems.append(f"{where} is not what the {role} role loads "
                            f"({describe_role(role)}): {choices}")
        elif source not in config["checkpoints"]:
            problems.append(f"{where}: add it to the preset's 'checkpoints' list too ({origins.of(['checkpoints'])}), "
                            "which says what the preset downloads")
    return problems


def describe_role(role):
    if role in PIXEL_BARRIER_ROLE_KINDS:
        return f"a {PIXEL_BARRIER_ROLE_KINDS[role]} network"
    if role in PIXEL_BARRIER_ROLE_FOLDERS:
        return f"a diffusers folder with {', '.join(PIXEL_BARRIER_ROLE_FOLDERS[role])}"
    return "one weight file"


def pixel_barrier_problems(config, origins):
    """Pixel is a Barrier: the claims' purifier runs and its strength is an edit strength, the purifiers' models are
    named, the claims' metric has the model it needs. (Rules of the whole block, not the schema's: a protect job's
    block holds no purifiers.)"""
    block, problems = config["pixel_barrier"], []
    models = block["models"]
    if CLAIMS_PURIFIER not in block["purifier_list"]:
        path = ["pixel_barrier", "purifier_list"]
        problems.append(
            f"config key '{dotted(path)}' = {block['purifier_list']} ({origins.of(path)}) must include "
            f"{CLAIMS_PURIFIER!r}: the claim 'PDM-Pure restores the clean edit' reads its edits; add it")
    for purifier, role in PURIFIER_MODELS.items():
        if purifier in block["purifier_list"] and not models[role]:
            path, role_path = ["pixel_barrier", "purifier_list"], ["pixel_barrier", "models", role]
            problems.append(
                f"config key '{dotted(path)}' ({origins.of(path)}) runs {purifier}, which needs "
                f"'{dotted(role_path)}' ({origins.of(role_path)}, now null): name its checkpoint "
                f"({', '.join(PIXEL_BARRIER_ROLE_FOLDERS[role])} folders; see config/checkpoints.yaml) and add it "
                f"to 'checkpoints', or drop {purifier}")
    if (block["step_size"] is None) == (block["relative_step_size"] is None):
        step_path, relative_path = ["pixel_barrier", "step_size"], ["pixel_barrier", "relative_step_size"]
        problems.append(
            f"config keys '{dotted(step_path)}' = {block['step_size']} ({origins.of(step_path)}) and "
            f"'{dotted(relative_path)}' = {block['relative_step_size']} ({origins.of(relative_path)}): set exactly one "
            "(the PGD step in [0, 1] units, Diff-Protect's 1/255 at every budget; or the step as a fraction of eps) "
            "and the other to null")
    edit = block["edit"]
    if not any(math.isclose(edit["purified_strength"], strength) for strength in edit["strengths"]):
        path, strengths_path = ["pixel_barrier", "edit", "purified_strength"], ["pixel_barrier", "edit", "strengths"]
        problems.append(
            f"config key '{dotted(path)}' = {edit['purified_strength']} ({origins.of(path)}) is not one of "
            f"'{dotted(strengths_path)}' = {edit['strengths']} ({origins.of(strengths_path)}): the claims compare the "
            "edits at that strength; add it to strengths or choose one of them")
    metric = block["claims"]["metric"]
    role = METRIC_MODELS.get(metric)
    if role and model_of_role(models, role) is None:
        path, role_path = ["pixel_barrier", "claims", "metric"], ["pixel_barrier", "models", role]
        value = "null" if models[role] is None else f"{models[role]!r} while 'pixel_barrier.models.classifier' is null"
        problems.append(
            f"config key '{dotted(path)}' = {metric!r} ({origins.of(path)}) needs a {role} model, but "
            f"'{dotted(role_path)}' is {value} ({origins.of(role_path)}): name one, or choose a metric that needs "
            "none (ssim, psnr)")
    return problems


# The model a per-image metric of the claims is computed with (ssim and psnr need none)
METRIC_MODELS = {"correct": "classifier", "feature_distance": "features"}


def model_of_role(models, role):
    """What gives pixel_barrier.models' `role`, or None: features 'classifier' is the classifier's penultimate layer,
    so it is None where the classifier is."""
    source = models[role]
    return models["classifier"] if role == "features" and source == "classifier" else source


def plan_problems(config, registry, origins):
    """Every problem of what the DAG would plan from this config, one line each (see the functions above)."""
    return (attack_name_problems(config, origins) + budget_problems(config, origins)
            + diffusion_classifier_problems(config, origins) + pixel_barrier_problems(config, origins)
            + pixel_barrier_model_problems(config, registry, origins)
            + pixel_barrier_target_problems(config, registry, origins))


# --- putting it together -------------------------------------------------------------------------------------------


def _preset_source(sources, presets_dir):
    """The preset file the sources choose, as the lowest-priority source."""
    chosen = {}
    for source in sources:
        chosen = deep_merge(chosen, source.values)
    preset = chosen.get("preset")
    presets = available_presets(presets_dir)
    if not isinstance(preset, str) or preset not in presets:
        folder = Path(presets_dir)
        folder = folder.relative_to(REPO_ROOT) if folder.is_relative_to(REPO_ROOT) else folder
        where = f" (the value came {Origins(sources).of(['preset'])})" if "preset" in chosen else ""
        raise ConfigError(
            f"unknown preset {preset!r}; available presets: {', '.join(presets)} (files in {folder}){where}. "
            "Choose one with --config preset=NAME or in config/config.yaml."
        )
    path = Path(presets_dir) / f"{preset}.yaml"
    name = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
    source = read_source(path)
    return ConfigSource(name, source.values)


def resolve_config(sources, presets_dir=PRESETS_DIR, schema_path=CONFIG_SCHEMA, checked_architectures=None):
    """Merge the chosen preset with the sources (lowest priority first), type, fill, check; a ResolvedConfig.
    `checked_architectures`: the file of architectures built before (architecture_problems)."""
    schema = read_yaml(schema_path)
    sources = [ConfigSource(s.name, read_text_values(s.values, schema), False) if s.as_text else s for s in sources]
    sources = [_preset_source(sources, presets_dir), *sources]
    origins = Origins(sources)
    merged = {}
    for source in sources:
        merged = deep_merge(merged, source.values)
    complete_architectures(merged, schema)
    notes, problems = normalise_numbers(merged, schema, origins)
    raise_problems(problems + schema_problems(merged, schema, origins))
    fill_defaults(schema, merged)
    resolve_stage_seeds(merged)
    # the defaults are checked too (a schema whose default breaks its own rule is a bug worth a clear message)
    raise_problems(schema_problems(merged, schema, origins))
    raise_problems(subset_problems(merged, origins))
    check_paths(merged, origins)
    registry = load_checkpoint_registry()
    check_consistency(merged, registry, origins)
    raise_problems(plan_problems(merged, registry, origins))
    resolve_pixel_barrier_target(merged, registry)
    raise_problems(architecture_problems(merged, origins, checked_architectures))
    return ResolvedConfig(merged, notes)


def load_config(overrides=None, presets_dir=PRESETS_DIR, schema_path=CONFIG_SCHEMA, *, sources=None):
    """The merged, validated config as a plain dict: from `sources` (ConfigSources, lowest priority first), or
    from one mapping of `overrides` (values as YAML or JSON gave them). Conversion notes go to the log."""
    if sources is None:
        sources = [ConfigSource("the overrides", _plain(overrides or {}))]
    resolved = resolve_config(sources, presets_dir, schema_path)
    for note in resolved.notes:
        log.warning("%s", note)
    return resolved.config


def checkpoint_registry_path():
    """config/checkpoints.yaml, or the file the environment variable DIFFROBUST_CHECKPOINTS names."""
    override = os.environ.get(CHECKPOINTS_REGISTRY_VARIABLE)
    if not override:
        return CHECKPOINTS_REGISTRY
    if not Path(override).is_file():
        raise ConfigError(f"{CHECKPOINTS_REGISTRY_VARIABLE}={override}: no such registry file (unset the variable to "
                          f"use {CHECKPOINTS_REGISTRY})")
    return Path(override)


def load_checkpoint_registry(path=None, schema_path=CHECKPOINTS_SCHEMA):
    """The checkpoint registry (`path`, else `checkpoint_registry_path()`), validated against its schema; every file
    must lie below data/checkpoints/ (no '..', absolute path or symlink out: checked again here, in code, beside the
    schema's pattern)."""
    from diffrobust.checkpoints import registry_path_problems

    path = path or checkpoint_registry_path()
    registry = read_yaml(path) or {}
    schema = read_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(registry))
    lines = [f"'{dotted(error.absolute_path)}': {error.message}" for error in errors]
    lines += registry_path_problems(registry, REPO_ROOT / "data" / "checkpoints")
    if lines:
        raise ConfigError(f"{path} is invalid:\n  - " + "\n  - ".join(lines))
    return registry


def checkpoint_files(registry, names):
    """(name, file entry) for every file of the named checkpoints, in registry order."""
    return [(name, entry) for name in names for entry in registry[name]["files"]]


# What each Pixel-is-a-Barrier job reads from the pixel_barrier block: a job's params are its identity (a changed value
# reruns it), so a protect job does not carry the purifiers' settings, nor an edit job the attacks'.
PIXEL_BARRIER_JOB_KEYS = {
    "protect": ("budgets", "steps", "step_size", "relative_step_size", "no_random_start", "mist_rate",
                "measure_draws", "target", "storage", "batch_size", "seed", "prompt"),
    "edit": ("edit", "purifier_list", "purifiers", "batch_size", "seed", "prompt"),
}


# The protective attacks that pull the latent toward Mist's target image (attacks.protective.objective_for): only
# their protect jobs read pixel_barrier.target, so only they have its file as an input and its digest as identity.
TARGET_IMAGE_ATTACKS = ("texture_only", "mist")


def pixel_barrier_target_problems(config, registry, origins):
    """pixel_barrier.target names one image: a file or a registry checkpoint of one file that the preset downloads
    (its `checkpoints` list)."""
    target, path = config["pixel_barrier"]["target"], ["pixel_barrier", "target", "checkpoint"]
    name = target.get("checkpoint")
    if name is None:
        return []
    where = f"config key '{dotted(path)}' = {name!r} ({origins.of(path)})"
    if target.get("file") is not None:
        file_path = ["pixel_barrier", "target", "file"]
        return [f"{where} and '{dotted(file_path)}' = {target['file']!r} ({origins.of(file_path)}) both name Mist's "
                "target image: set one of them to null"]
    if name not in registry:
        return [f"{where} is not a checkpoint of config/checkpoints.yaml (Diff-Protect's is diff_protect_mist_target)"]
    if len(registry[name]["files"]) != 1:
        return [f"{where} has {len(registry[name]['files'])} files in config/checkpoints.yaml; a target image is one"]
    if name not in config["checkpoints"]:
        return [f"{where}: add it to the preset's 'checkpoints' list too ({origins.of(['checkpoints'])}), which says "
                "what the preset downloads"]
    return []


def resolve_pixel_barrier_target(config, registry):
    """Point pixel_barrier.target.file at the registry file that target.checkpoint names (downloaded and checked
    against the lock by the DAG's fetch job), so that every job reads the target through `file`; the checkpoint
    name stays in the block as the target's provenance. Call after pixel_barrier_target_problems."""
    from diffrobust.checkpoints import checkpoint_path

    target = config["pixel_barrier"]["target"]
    if target.get("checkpoint") is not None:
        name = target["checkpoint"]
        target["file"] = str(checkpoint_path(name, registry[name]["files"][0]))


def pixel_barrier_target_file(block, attack):
    """The target image file the protect job of `attack` reads (None: it reads none, or the target is the
    checkerboard), from the merged pixel_barrier block."""
    return block["target"].get("file") if attack in TARGET_IMAGE_ATTACKS else None


def pixel_barrier_job_settings(block, kind):
    """The settings a protect or edit job takes, from the merged pixel_barrier block (see PIXEL_BARRIER_JOB_KEYS):
    the edit job gets only the purifiers it runs, the protect job none."""
    settings = {key: block[key] for key in PIXEL_BARRIER_JOB_KEYS[kind]}
    if kind == "protect":
        settings["purifier_list"] = []
    else:
        settings["purifiers"] = {name: block["purifiers"][name] for name in block["purifier_list"]}
    return settings


def missing_job_keys(settings, kind):
    """Keys of PIXEL_BARRIER_JOB_KEYS[kind] that `settings` lacks (a direct CLI call with a partial block)."""
    return [key for key in PIXEL_BARRIER_JOB_KEYS[kind] if key not in settings]
