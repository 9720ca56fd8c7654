"""pyproject.toml is the one place where versions are pinned; the conda environment files must agree with it."""

import tomllib

import yaml


def _pins(requirements):
    pins = {}
    for line in requirements:
        name, _, version = line.partition("==")
        pins[name.strip().lower()] = version.strip()
    return pins


def _conda_pins(path):
    env = yaml.safe_load(path.read_text())
    conda = {}
    pip = []
    for dependency in env["dependencies"]:
        if isinstance(dependency, dict):
            pip = dependency["pip"]
        elif "=" in dependency:
            name, version = dependency.split("=", 1)
            conda[{"pytorch": "torch"}.get(name, name)] = version
    return conda, pip


def test_pyproject_pins_every_dependency_exactly(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        assert "==" in requirement, f"{requirement} is not pinned"
    pins = _pins(project["dependencies"])
    assert pins["torch"].startswith("2.15") and pins["torchvision"].startswith("0.29")


def test_rule_environment_matches_pyproject(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    pins = _pins(project["dependencies"])
    conda, pip = _conda_pins(repo_root / "workflow" / "envs" / "diffrobust.yaml")
    assert conda["torch"] == pins["torch"] and conda["torchvision"] == pins["torchvision"]
    assert _pins(pip) == {k: v for k, v in pins.items() if k not in ("torch", "torchvision")}


def test_root_environment_installs_the_package_with_the_same_torch(repo_root):
    pins = _pins(tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"])
    conda, pip = _conda_pins(repo_root / "environment.yml")
    assert conda["torch"] == pins["torch"] and conda["torchvision"] == pins["torchvision"]
    assert pip == ["-e .[test]"]
