"""Preset merging, schema defaults and the error messages a person sees for bad config."""

import json
import math

import pytest
import yaml
from snakemake.cli import parse_config

from diffrobust import config as config_module
from diffrobust.config import (CONFIG_SCHEMA, ConfigError, ConfigSource, available_presets, deep_merge,
                               load_checkpoint_registry, load_config, read_source, read_text_values, read_yaml,
                               resolve_config, workflow_sources)


def test_every_preset_loads_and_is_complete():
    assert available_presets() == ["cifar10", "imagenet", "mini", "smoke"]
    for preset in available_presets():
        config = load_config({"preset": preset})
        assert config["preset"] == preset
        # defaults are filled down to the leaves
        assert config["datasets"]["mnist"] == {"test_per_class": 100, "split_seed": 0, "pad_to": 32}
        assert config["datasets"]["cifar10"]["md5"] == "c58f30108f718f92721af3b95e74349a"


def test_presets_follow_the_papers_protocols():
    cifar, imagenet = load_config({"preset": "cifar10"}), load_config({"preset": "imagenet"})
    assert cifar["subsets"]["densepure"] == {"start": 0, "stop": 10000, "step": 20}
    assert imagenet["subsets"]["densepure"] == {"start": 0, "stop": 50000, "step": 500}
    assert cifar["subsets"]["diffpure"] == {"n": 64, "seeds": list(range(8))}
    assert "improved_diffusion_cifar10_uncond" in cifar["checkpoints"]
    assert "guided_diffusion_256_uncond" in imagenet["checkpoints"]


def test_overrides_win_over_the_preset_and_merge_deeply():
    config = load_config({"preset": "mini", "datasets": {"mnist": {"split_seed": 3}},
                          "subsets": {"densepure": {"stop": 10}}})
    assert config["datasets"]["mnist"] == {"test_per_class": 100, "split_seed": 3, "pad_to": 32}
    assert config["subsets"]["densepure"] == {"start": 0, "stop": 10, "step": 25}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"preset": "minii"}, ["unknown preset 'minii'", "cifar10, imagenet, mini, smoke"]),
        ({"preset": "mini", "datasets": {"mnist": {"test_per_clas": 5}}},
         ["unknown config key 'datasets.mnist.test_per_clas' in datasets.mnist", "did you mean 'test_per_class'?",
          "allowed keys there: pad_to, split_seed, test_per_class"]),
        ({"preset": "mini", "datasets": {"mnist": {"test_per_class": -5}}},
         ["'datasets.mnist.test_per_class' = -5", "must be >= 1"]),
        ({"preset": "mini", "subsets": {"densepure": {"start": 0, "stop": 10, "step": 0}}},
         ["'subsets.densepure.step' = 0", "must be >= 1", "range {start, stop, step}"]),
        ({"preset": "mini", "seed": "zero"}, ["'seed' = 'zero'", "must be of type integer"]),
        ({"preset": "mini", "dataset": "svhn"}, ["'dataset' = 'svhn'", "'mnist', 'cifar10', 'imagenet'"]),
        ({"preset": "mini", "checkpoints": ["no_such_model"]}, ["'no_such_model'", "improved_diffusion_cifar10_uncond"]),
        ({"preset": "mini", "datasets": {"cifar10": {"tarball": "/no/such/cifar.tar.gz"}}},
         ["'datasets.cifar10.tarball'", "no such file"]),
    ],
)
def test_bad_config_names_the_key_and_what_is_allowed(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(overrides)
    for fragment in expected:
        assert fragment in str(error.value)


def test_error_says_where_the_bad_value_came_from(tmp_path):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "bad.yaml").write_text("dataset: mnist\nseed: -1\n")
    with pytest.raises(ConfigError) as error:
        load_config({"preset": "bad"}, presets_dir=presets)
    assert f"'seed' = -1 (from {presets / 'bad.yaml'})" in str(error.value)
    with pytest.raises(ConfigError, match="'seed' = -1 \\(from the overrides\\)"):
        load_config({"preset": "mini", "seed": -1})


def test_checkpoint_registry_is_valid_and_complete():
    registry = load_checkpoint_registry()
    required = {"improved_diffusion_cifar10_uncond", "guided_diffusion_256_uncond", "edm_cifar10_cond_vp",
                "vit_b16_cifar10", "beit_large_patch16_512_imagenet", "robustbench_cifar10_standard_wrn28_10",
                "stable_diffusion_v1_4", "deepfloyd_if_stage2_large",
                # RDC's adversarial-training baselines, one per threat model
                "robustbench_cifar10_linf_wang2023better_wrn70_16", "robustbench_cifar10_l2_wang2023better_wrn70_16",
                "robustbench_cifar10_linf_rebuffi2021fixing_70_16_cutmix_ddpm",
                "robustbench_cifar10_l2_rebuffi2021fixing_70_16_cutmix_ddpm"}
    assert required <= set(registry)
    for name, entry in registry.items():
        for file_entry in entry["files"]:
            # a file nobody can fetch by script must say what to do by hand
            assert file_entry["urls"] or "manual" in entry, name


# --- sources, --config typing, closed schema, stage seeds, integers, subsets (issue 9) ----------------------------


def command_line(*entries):
    """The --config source as Snakemake hands it over (its own parser: a top-level value typed, a nested one read
    with YAML's BaseLoader, so all text)."""
    return ConfigSource("--config", parse_config(list(entries)), as_text=True)


def resolve(*sources):
    return resolve_config([ConfigSource("config/config.yaml", {"preset": "mini"}), *sources])


def config_error(*sources):
    with pytest.raises(ConfigError) as error:
        resolve(*sources)
    return str(error.value)


def test_nested_config_values_are_read_as_yaml():
    config = resolve(command_line("densepure={votes: 5, n: 1000, sigmas: [0.3, 0.6], radii: [0.0, 0.5]}")).config
    assert config["densepure"]["votes"] == 5 and type(config["densepure"]["votes"]) is int
    assert config["densepure"]["n"] == 1000
    assert config["densepure"]["sigmas"] == [0.3, 0.6] and config["densepure"]["radii"] == [0.0, 0.5]
    assert config["densepure"]["n0"] == 10  # the rest of the block still comes from the preset


def test_strings_stay_strings_where_the_schema_takes_a_string():
    schema = read_yaml(CONFIG_SCHEMA)
    text = yaml.load("{imagenet: {val_dir: /data/2012, image_size: 224}, cifar10: {tarball: null, md5: "
                     "'00000000000000000000000000000000'}}", Loader=yaml.BaseLoader)
    values = read_text_values({"datasets": text, "description": 2012, "seed": 3}, schema)
    assert values["datasets"]["imagenet"] == {"val_dir": "/data/2012", "image_size": 224}
    assert values["datasets"]["cifar10"] == {"tarball": None, "md5": "0" * 32}  # not the integer 0
    assert values["description"] == "2012" and values["seed"] == 3
    # a string-typed flag whose text YAML would read as a number keeps its text
    architecture = yaml.load("{diffusion: {architecture: {config: {attention_resolutions: 8, learn_sigma: false}}}}",
                             Loader=yaml.BaseLoader)
    assert read_text_values({"models": architecture}, schema)["models"]["diffusion"]["architecture"]["config"] == {
        "attention_resolutions": "8", "learn_sigma": False}
    config = resolve(command_line("preset=imagenet", "datasets={imagenet: {val_dir: /data/2012}}")).config
    assert config["datasets"]["imagenet"]["val_dir"] == "/data/2012"


def test_values_from_files_are_taken_as_yaml_gave_them(tmp_path):
    path = tmp_path / "local.yaml"
    path.write_text("description: '2012'\ndensepure: {votes: '5'}\n")
    message = config_error(read_source(path))
    assert f"config key 'densepure.votes' = '5' (from {path}) must be of type integer" in message


def test_out_of_range_override_is_refused_as_out_of_range_and_blamed_on_the_command_line():
    message = config_error(command_line("densepure={votes: 0}"))
    assert "config key 'densepure.votes' = 0 (from --config) must be >= 1" in message
    assert "type" not in message


def test_bad_list_item_is_blamed_on_the_source_of_the_list(tmp_path):
    message = config_error(command_line("densepure={radii: [0.0, -0.5]}"))
    assert "config key 'densepure.radii.1' = -0.5 (from --config) must be >= 0" in message
    assert "mini.yaml" not in message
    path = tmp_path / "radii.yaml"
    path.write_text("densepure:\n  radii: [0.0, -0.5]\n")
    assert f"config key 'densepure.radii.1' = -0.5 (from {path}) must be >= 0 (radii of Table 1)" in config_error(
        read_source(path))


def test_the_highest_source_holding_a_key_is_named(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("densepure: {n: -1, n0: -1}\n")
    second.write_text("densepure: {n0: -2}\n")
    message = config_error(read_source(first), read_source(second))
    assert f"'densepure.n' = -1 (from {first})" in message
    assert f"'densepure.n0' = -2 (from {second})" in message
    assert "'densepure.n' = 1 (from --config)" not in message
    message = config_error(read_source(first), command_line("densepure={n: 1, n0: 0}"))
    assert "'densepure.n0' = 0 (from --config)" in message and "'densepure.n'" not in message


@pytest.mark.parametrize("block, key", [
    ("{diffusion: {training: {stepz: 5}}}", "models.diffusion.training.stepz"),
    ("{multihead: {finetune: {lr_decay: 0.1}}}", "models.multihead.finetune.lr_decay"),
    ("{classifier: {training: {epoch: 3}}}", "models.classifier.training.epoch"),
    ("{diffusion: {architecture: {config: {num_channel: 64}}}}", "models.diffusion.architecture.config.num_channel"),
    ("{diffusion: {architecture: {config: {diffusion_steps: 50}}}}",
     "models.diffusion.architecture.config.diffusion_steps"),
    ("{classifier: {architecture: {famly: small_resnet}}}", "models.classifier.architecture.famly"),
    ("{classifier: {architecture: {config: {widht: 8}}}}", "models.classifier.architecture.config.widht"),
])
def test_a_typo_anywhere_is_refused_naming_the_full_key(block, key):
    message = config_error(command_line(f"models={block}"))
    assert f"unknown config key '{key}'" in message and "(from --config)" in message


def test_typo_in_a_configfile_names_the_file_and_the_closest_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("models: {diffusion: {training: {stepz: 5}}}\n")
    message = config_error(read_source(path))
    assert f"unknown config key 'models.diffusion.training.stepz' in models.diffusion.training (from {path})" in message
    assert "did you mean 'steps'?" in message


def _objects(node, path=()):
    """Every object schema in the config schema, with where it sits (not the conditions of an if/then: they test
    values that the block around them describes)."""
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield path, node
        for key, child in node.items():
            if key != "if":
                yield from _objects(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _objects(child, (*path, index))


def test_every_block_of_the_schema_is_closed():
    objects = list(_objects(read_yaml(CONFIG_SCHEMA)))
    assert len(objects) > 20
    # closed: no unknown keys; or a map of user-chosen names (diffpure.attacks) whose every value is a closed block
    open_blocks = [".".join(map(str, path)) for path, node in objects
                   if node.get("additionalProperties") is not False
                   and not (isinstance(node.get("additionalProperties"), dict)
                            and node["additionalProperties"].get("additionalProperties") is False)]
    assert open_blocks == []


def test_architecture_schemas_list_what_the_builders_accept():
    from diffrobust.models import ADM_UNET_EXTRA_KEYS
    from diffrobust.networks.adm import GUIDED_DIFFUSION_DEFAULTS, build_guided_diffusion_unet
    from diffrobust.networks.classifiers import SMALL_RESNET_DEFAULTS

    definitions = read_yaml(CONFIG_SCHEMA)["$defs"]
    # guided-diffusion's diffusion-only flags are accepted and ignored by its builder: refused in the config
    diffusion_flags = {"diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
                       "rescale_timesteps", "rescale_learned_sigmas", "sigma_small"}
    assert set(definitions["adm_unet_config"]["properties"]) == (
        set(GUIDED_DIFFUSION_DEFAULTS) - diffusion_flags) | set(ADM_UNET_EXTRA_KEYS)
    assert diffusion_flags <= set(GUIDED_DIFFUSION_DEFAULTS)
    assert "ignored" in build_guided_diffusion_unet.__doc__
    assert set(definitions["small_resnet_config"]["properties"]) == set(SMALL_RESNET_DEFAULTS)


@pytest.mark.parametrize("block, fragments", [
    ("{classifier: {architecture: {config: {depth: 10}}}}",
     ["'models.classifier.architecture' (from --config)", "small_resnet builder refuses it", "6n+2"]),
    ("{diffusion: {architecture: {config: {attention_resolutions: '3'}}}}",
     ["'models.diffusion.architecture' (from --config)", "adm_unet builder", "attention_resolutions"]),
    ("{diffusion: {architecture: {config: {in_channels: 3}}}}",
     ["'models.diffusion.architecture'", "in_channels=3", "does not fit the dataset"]),
    ("{diffusion: {architecture: {config: {learn_sigma: true}}}}",
     ["'models.diffusion.architecture.config.learn_sigma' = True (from --config) must be one of False"]),
])
def test_architectures_are_built_when_the_config_is_checked(block, fragments):
    message = config_error(command_line(f"models={block}"))
    for fragment in fragments:
        assert fragment in message


def test_checked_architectures_are_remembered_and_not_built_again(tmp_path, monkeypatch):
    import diffrobust.models

    checked = tmp_path / "checked.json"
    builds = []
    real_build = diffrobust.models.build_architecture
    monkeypatch.setattr(diffrobust.models, "build_architecture", lambda a: builds.append(a) or real_build(a))
    base = [ConfigSource("config/config.yaml", {"preset": "mini"})]
    resolve_config(base, checked_architectures=checked)
    assert len(builds) == 2 and len(json.loads(checked.read_text())["checked"]) == 2  # diffusion and classifier
    resolve_config(base, checked_architectures=checked)
    assert len(builds) == 2  # both remembered: nothing built, no torch needed
    # a changed architecture is built (and remembered); a refused one still fails with the cache warm
    resolve_config([*base, command_line("models={classifier: {architecture: {config: {depth: 14}}}}")],
                   checked_architectures=checked)
    assert len(builds) == 3 and len(json.loads(checked.read_text())["checked"]) == 3
    with pytest.raises(ConfigError, match="6n\\+2"):
        resolve_config([*base, command_line("models={classifier: {architecture: {config: {depth: 10}}}}")],
                       checked_architectures=checked)
    assert len(json.loads(checked.read_text())["checked"]) == 3
    # a change to the builders' code forgets every earlier check
    monkeypatch.setattr("diffrobust.config.builder_digest", lambda: "other code")
    resolve_config(base, checked_architectures=checked)
    assert len(builds) == 6


def test_a_partial_architecture_override_changes_one_key_of_the_default_network():
    config = resolve(command_line("models={classifier: {architecture: {config: {depth: 14}}}}")).config
    assert config["models"]["classifier"]["architecture"] == {"family": "small_resnet",
                                                              "config": {"width": 16, "depth": 14}}
    config = resolve(command_line("models={diffusion: {architecture: {config: {num_channels: 64}}}}")).config
    architecture = config["models"]["diffusion"]["architecture"]["config"]
    assert architecture["num_channels"] == 64 and architecture["patch_size"] == 2  # merged into the preset's block


def test_every_preset_builds_its_networks():
    for preset in available_presets():
        resolve(ConfigSource("--config", {"preset": preset}, as_text=True))


def test_stage_seeds_follow_the_global_seed_unless_set():
    assert resolve().config["densepure"]["seed"] == 0
    config = resolve(command_line("seed=7")).config
    assert config["seed"] == 7 and config["densepure"]["seed"] == 7
    config = resolve(command_line("seed=7", "densepure={seed: 3}")).config
    assert config["densepure"]["seed"] == 3
    # the split of the test set that the subsets index does not follow the seed (see the schema)
    assert config["datasets"]["mnist"]["split_seed"] == 0
    schema = read_yaml(CONFIG_SCHEMA)
    assert "default" not in schema["properties"]["densepure"]["properties"]["seed"]
    assert "densepure.seed" in schema["properties"]["seed"]["description"]


def test_whole_floats_become_integers_and_are_noted(tmp_path):
    path = tmp_path / "floats.yaml"
    path.write_text("densepure: {n: 6.0e+1, alpha: 1.0e-3}\nmodels: {diffusion: {training: {steps: 4.0}}}\n")
    resolved = resolve(read_source(path))
    densepure = resolved.config["densepure"]
    assert densepure["n"] == 60 and type(densepure["n"]) is int
    assert type(resolved.config["models"]["diffusion"]["training"]["steps"]) is int
    assert densepure["alpha"] == 0.001
    assert json.dumps(densepure["n"]) == "60"  # what the job's --settings JSON carries
    assert f"config key 'densepure.n' = 60.0 (from {path}) is a whole number: read as the integer 60" in resolved.notes
    assert len(resolved.notes) == 2
    resolved = resolve(command_line("densepure={n: 6.0e+1}"))
    assert type(resolved.config["densepure"]["n"]) is int
    assert resolved.config["densepure"]["sigmas"] == [0.25, 0.5, 1.0]  # number keys keep their floats


def test_fractional_floats_where_an_integer_is_expected_are_refused():
    message = config_error(command_line("densepure={n: 60.5}"))
    assert "config key 'densepure.n' = 60.5 (from --config) must be of type integer" in message


def test_a_number_yaml_reads_as_text_gets_a_hint():
    message = config_error(command_line("densepure={n: 1e5}"))
    assert "'densepure.n' = '1e5' (from --config) must be of type integer" in message
    assert "write 100000" in message


def test_floats_must_be_finite():
    message = config_error(command_line("densepure={sigmas: [.inf], alpha: .nan}"))
    assert "config key 'densepure.sigmas.0' = inf (from --config) must be a finite number" in message
    assert "config key 'densepure.alpha' = nan (from --config) must be a finite number" in message


def test_subsets_beyond_the_split_are_refused_naming_the_split_size():
    message = config_error(command_line("subsets={densepure: {stop: 5000}}"))
    assert "config key 'subsets.densepure'" in message and "reaches index 4975" in message
    assert "only 1000 images" in message and "(from --config;" in message
    assert "datasets.mnist.test_per_class = 100 (from config/presets/mini.yaml) = 1000 images" in message
    # a smaller test split makes the preset's subsets too large: the split's source is named
    message = config_error(command_line("datasets={mnist: {test_per_class: 10}}"))
    assert "only 100 images" in message and "datasets.mnist.test_per_class = 10 (from --config)" in message
    message = config_error(command_line("preset=cifar10", "subsets={diffpure: {n: 20000, seeds: [0]}}"))
    assert "'subsets.diffpure.n' = 20000 exceeds the split size 10000" in message


def test_eval_split_size_is_the_one_computation_of_it():
    assert config_module.eval_split_size(resolve().config) == 1000
    assert config_module.eval_split_size(resolve(command_line("datasets={mnist: {test_per_class: 50}}",
                                                               "subsets={densepure: {stop: 500}}")).config) == 500
    assert config_module.eval_split_size(resolve(command_line("preset=imagenet")).config) == 50000
    common = (config_module.REPO_ROOT / "workflow" / "rules" / "common.smk").read_text()
    assert "eval_split_size(CFG)" in common and "EVAL_SPLIT_SIZE" not in common


def test_workflow_sources_keep_snakemakes_order_and_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("preset: mini\ndensepure: {n: 50}\n")
    (tmp_path / "local.yaml").write_text("densepure: {n: 40, n0: 5}\n")
    sources = workflow_sources(["config/config.yaml"], [tmp_path / "local.yaml"], {"densepure": {"n0": "4"}})
    assert [source.name for source in sources] == ["config/config.yaml", "local.yaml", "--config"]
    config = resolve_config(sources).config
    assert (config["densepure"]["n"], config["densepure"]["n0"]) == (40, 4)
    replaced = workflow_sources(["config/config.yaml"], [tmp_path / "local.yaml"], {"preset": "smoke"},
                                replace_workflow_config=True)
    assert [source.name for source in replaced] == ["local.yaml", "--config"]
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml: must be a mapping of config keys"):
        workflow_sources([], ["list.yaml"], {})


def test_unknown_preset_names_its_source():
    message = config_error(command_line("preset=minii"))
    assert "unknown preset 'minii'; available presets: cifar10, imagenet, mini, smoke" in message
    assert "(the value came from --config)" in message


def test_merged_config_passes_the_schema_with_strict_integers():
    """What the jobs receive has ints where the schema says integer (the CLI holds its arguments to that)."""
    import jsonschema

    strict = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool))
    validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=strict)
    schema = read_yaml(CONFIG_SCHEMA)
    for preset in available_presets():
        config = resolve(command_line(f"preset={preset}", "densepure={n: 6.0e+1, votes: 40.0}",
                                       "seed=2.0")).config
        assert list(validator(schema).iter_errors(config)) == [], preset
        assert not any(isinstance(v, float) and not math.isfinite(v) for v in config["densepure"]["sigmas"])
