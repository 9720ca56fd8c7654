"""config.parse_yaml (libyaml's safe loader where available) reads the project's YAML exactly as yaml.safe_load does,
and config.read_yaml's cache never hands out a shared or stale value (issue 22: job start-up)."""

import os

import pytest
import yaml

from diffrobust import config
from diffrobust.config import CHECKPOINTS_REGISTRY, CONFIG_SCHEMA, PRESETS_DIR, ConfigError, parse_yaml, read_yaml

PROJECT_YAML = [*sorted(PRESETS_DIR.glob("*.yaml")), CHECKPOINTS_REGISTRY, CONFIG_SCHEMA,
                config.CHECKPOINTS_SCHEMA]


def test_libyaml_is_used_where_pyyaml_has_it():
    assert config._SAFE_LOADER is (yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader)


@pytest.mark.parametrize("path", PROJECT_YAML, ids=lambda path: path.name)
def test_parse_yaml_reads_project_files_as_safe_load_does(path):
    text = path.read_text()
    expected = yaml.safe_load(text)
    assert expected  # not an empty file: the comparison means something
    assert parse_yaml(text) == expected
    assert read_yaml(path) == expected


@pytest.mark.parametrize("text", ["a: 1e3\nb: 0o17\nc: 2026-12-06\nd: [yes, no, ~]\ne: '007'\nf: .inf\n",
                                  "- !!str 5\n- &x {k: v}\n- *x\n", "plain text", ""])
def test_parse_yaml_types_values_as_safe_load_does(text):
    assert parse_yaml(text) == yaml.safe_load(text)


def test_parse_yaml_refuses_what_safe_load_refuses():
    with pytest.raises(yaml.YAMLError):
        parse_yaml("!!python/object/apply:os.system ['true']")
    with pytest.raises(yaml.YAMLError):
        parse_yaml("a: [1, 2")


def test_read_yaml_returns_independent_copies(tmp_path):
    path = tmp_path / "block.yaml"
    path.write_text("outer: {inner: [1, 2]}\n")
    first = read_yaml(path)
    first["outer"]["inner"].append(3)
    first["added"] = True
    second = read_yaml(path)
    assert second == {"outer": {"inner": [1, 2]}}
    assert second["outer"]["inner"] is not first["outer"]["inner"]


def test_read_yaml_reads_a_changed_file_afresh(tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text("n: 1\n")
    assert read_yaml(path) == {"n": 1}
    # same size and, on a coarse clock, the same modification time: the text itself tells the change
    stat = path.stat()
    path.write_text("n: 2\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert read_yaml(path) == {"n": 2}
    path.write_text("n: 1\n")
    assert read_yaml(path) == {"n": 1}


def test_read_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'absent.yaml'}: file not found"):
        read_yaml(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=f"(?s){broken}: not valid YAML: .*line 2"):
        read_yaml(broken)


def test_the_registry_readers_hand_out_copies():
    from diffrobust import models

    name = next(iter(models._read_registry(None)))
    models._read_registry(None)[name]["files"] = []
    config.load_checkpoint_registry()[name]["files"] = []
    assert models._read_registry(None)[name]["files"]
    assert config.load_checkpoint_registry()[name]["files"]


def test_the_download_lock_is_read_afresh_after_each_write(tmp_path):
    from diffrobust import download

    lock = tmp_path / "checkpoints.lock.yaml"
    assert download.read_lock(lock) == {}
    lock.write_text("a/b.pt: {sha256: '01'}\n")
    entries = download.read_lock(lock)
    assert entries == {"a/b.pt": {"sha256": "01"}}
    entries["a/b.pt"]["sha256"] = "changed"
    lock.write_text("a/b.pt: {sha256: '01'}\nc/d.pt: {sha256: '02'}\n")
    assert download.read_lock(lock) == {"a/b.pt": {"sha256": "01"}, "c/d.pt": {"sha256": "02"}}
    lock.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        download.read_lock(lock)
