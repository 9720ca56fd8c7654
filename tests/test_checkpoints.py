"""Checkpoint registry paths: every file of config/checkpoints.yaml lies below data/checkpoints/<name>/, refused by
the registry's schema and again by the code that builds the path (issue 21, item 13)."""

import jsonschema
import pytest
import yaml

from diffrobust import models
from diffrobust.checkpoints import CheckpointPathError, checkpoint_path
from diffrobust.config import CHECKPOINTS_SCHEMA, ConfigError, load_checkpoint_registry, read_yaml

# (checkpoint name, file path, what the message says)
ESCAPES = [
    ("evil", "../../outside.pt", "'..' part"),
    ("evil", "sub/../../../outside.pt", "'..' part"),
    ("evil", "/etc/passwd", "absolute path"),
    ("evil", "./model.pt", "'.' part"),
    ("..", "outside.pt", "'..' part"),
]


def _registry(name, file_path):
    return {name: {"description": "a tampered entry", "paper": ["none"], "license": "none", "source": "a test",
                   "files": [{"path": file_path, "urls": ["https://example.org/model.pt"]}]}}


@pytest.mark.parametrize("name, file_path, reason", ESCAPES)
def test_registry_entry_leading_out_of_data_checkpoints_is_refused_at_load(tmp_path, name, file_path, reason):
    registry_file = tmp_path / "checkpoints.yaml"
    registry_file.write_text(yaml.safe_dump(_registry(name, file_path)))
    with pytest.raises(ConfigError, match=f"checkpoint registry entry '{name}', file '{file_path}': .*{reason}"):
        load_checkpoint_registry(registry_file)


@pytest.mark.parametrize("name, file_path, reason", ESCAPES)
def test_schema_alone_refuses_the_escapes(name, file_path, reason):
    validator = jsonschema.Draft202012Validator(read_yaml(CHECKPOINTS_SCHEMA))
    errors = list(validator.iter_errors(_registry(name, file_path)))
    assert errors and all(error.validator == "pattern" for error in errors)


@pytest.mark.parametrize("name, file_path, reason", ESCAPES)
def test_code_that_builds_the_path_refuses_the_escapes_without_the_schema(tmp_path, name, file_path, reason):
    root = tmp_path / "data" / "checkpoints"
    with pytest.raises(CheckpointPathError, match=f"entry '{name}', file '{file_path}': .*{reason}"):
        checkpoint_path(name, {"path": file_path}, root)
    # the loaders build their paths through it: an unchecked registry dict cannot lead them out either
    with pytest.raises(CheckpointPathError, match=reason):
        models.source_files(name, root, registry=_registry(name, file_path))


def test_symlink_out_of_data_checkpoints_is_refused(tmp_path):
    root, outside = tmp_path / "data" / "checkpoints", tmp_path / "elsewhere"
    root.mkdir(parents=True)
    outside.mkdir()
    (root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointPathError, match=f"entry 'linked', file 'model.pt': .*resolves to {outside}/model.pt"):
        checkpoint_path("linked", {"path": "model.pt"}, root)
    # a symlink that stays inside root is a path inside it
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    assert checkpoint_path("alias", {"path": "sub/model.pt"}, root) == root / "alias" / "sub" / "model.pt"
    # data/checkpoints itself a link to another disk (what the README suggests): its files are inside it
    (tmp_path / "data" / "linked-root").symlink_to(outside, target_is_directory=True)
    linked_root = tmp_path / "data" / "linked-root"
    assert checkpoint_path("edm", {"path": "model.pkl"}, linked_root) == linked_root / "edm" / "model.pkl"


def test_project_registry_paths_are_below_data_checkpoints():
    registry = load_checkpoint_registry()
    for name, entry in registry.items():
        for file_entry in entry["files"]:
            path = checkpoint_path(name, file_entry, "data/checkpoints")
            assert path.parts[:3] == ("data", "checkpoints", name) and ".." not in path.parts
