"""Preset merging, schema defaults and the error messages a person sees for bad config."""

import pytest

from diffrobust.config import ConfigError, available_presets, deep_merge, load_checkpoint_registry, load_config


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
    config = load_config({"preset": "mini", "datasets": {"mnist": {"split_seed": 3}}, "subsets": {"rdc": {"stop": 10}}})
    assert config["datasets"]["mnist"] == {"test_per_class": 100, "split_seed": 3, "pad_to": 32}
    assert config["subsets"]["rdc"] == {"start": 0, "stop": 10}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"preset": "minii"}, ["unknown preset 'minii'", "cifar10, imagenet, mini, smoke"]),
        ({"preset": "mini", "datasets": {"mnist": {"test_per_clas": 5}}},
         ["unknown config key 'test_per_clas' in datasets.mnist", "allowed keys there: pad_to, split_seed, test_per_class"]),
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
    with pytest.raises(ConfigError, match="from config/presets/bad.yaml"):
        load_config({"preset": "bad"}, presets_dir=presets)
    with pytest.raises(ConfigError, match="from config/config.yaml, --configfile or --config"):
        load_config({"preset": "mini", "seed": -1})


def test_checkpoint_registry_is_valid_and_complete():
    registry = load_checkpoint_registry()
    required = {"improved_diffusion_cifar10_uncond", "guided_diffusion_256_uncond", "edm_cifar10_cond_vp",
                "vit_b16_cifar10", "beit_large_patch16_512_imagenet", "robustbench_cifar10_standard_wrn28_10",
                "stable_diffusion_v1_4", "deepfloyd_if_stage2_large"}
    assert required <= set(registry)
    for name, entry in registry.items():
        for file_entry in entry["files"]:
            # a file nobody can fetch by script must say what to do by hand
            assert file_entry["urls"] or "manual" in entry, name
