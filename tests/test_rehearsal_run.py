"""The rehearsal's registry plumbing: the registry it hands its jobs (reduced architectures), the variable that points
every reader at it, and where it places each checkpoint's files (mirror, or by hand for gated ones)."""

import copy

import pytest
import yaml

from diffrobust import config, models
from diffrobust.config import CHECKPOINTS_REGISTRY, CHECKPOINTS_REGISTRY_VARIABLE, ConfigError
from diffrobust.rehearsal import run

REGISTRY = yaml.safe_load(CHECKPOINTS_REGISTRY.read_text())


def _arch(width):
    return {"family": "toy", "config": {"width": width}}


def test_rehearsal_registry_replaces_only_reported_architectures_of_reduced_networks():
    registry = {"small": {"architecture": _arch(64), "files": []},
                "official": {"architecture": _arch(64), "files": []},
                "silent": {"architecture": _arch(64), "files": []},
                "picture": {"files": [{"path": "MIST.png"}]},
                "untouched": {"architecture": _arch(64), "files": []}}
    before = copy.deepcopy(registry)
    made = {"small": {"reduced": "width 64 -> 16", "architecture": _arch(16)},
            # built at full size: its architecture (even if reported) stays the registry's
            "official": {"reduced": None, "architecture": _arch(16)},
            # reduced but reports no architecture: nothing to put in its place
            "silent": {"reduced": "width 64 -> 16"},
            # no architecture block in the registry: none is added
            "picture": {"reduced": "something", "architecture": _arch(16)}}
    result = run.rehearsal_registry(registry, made)
    assert result["small"]["architecture"] == _arch(16)
    for name in ("official", "silent", "untouched", "picture"):
        assert result[name] == before[name]
    assert registry == before  # the input is not mutated ...
    result["official"]["architecture"]["config"]["width"] = 1
    assert registry["official"]["architecture"]["config"]["width"] == 64  # ... nor shared with the result


def test_registry_path_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(CHECKPOINTS_REGISTRY_VARIABLE, raising=False)
    assert config.checkpoint_registry_path() == CHECKPOINTS_REGISTRY
    monkeypatch.setenv(CHECKPOINTS_REGISTRY_VARIABLE, "")  # empty counts as unset
    assert config.checkpoint_registry_path() == CHECKPOINTS_REGISTRY

    name = "diff_protect_mist_target"
    entry = copy.deepcopy(REGISTRY[name])
    entry["files"][0]["size"] = 1234
    override = tmp_path / "checkpoints.yaml"
    override.write_text(yaml.safe_dump({name: entry}))
    monkeypatch.setenv(CHECKPOINTS_REGISTRY_VARIABLE, str(override))
    assert config.checkpoint_registry_path() == override
    loaded = config.load_checkpoint_registry()
    assert list(loaded) == [name] and loaded[name]["files"][0]["size"] == 1234
    read = models._read_registry(None)
    assert list(read) == [name] and read[name]["files"][0]["size"] == 1234
    # an explicit path still wins over the variable
    assert len(config.load_checkpoint_registry(CHECKPOINTS_REGISTRY)) == len(REGISTRY) > 1


def test_missing_registry_file_names_the_variable_and_the_file(tmp_path, monkeypatch):
    missing = tmp_path / "gone.yaml"
    monkeypatch.setenv(CHECKPOINTS_REGISTRY_VARIABLE, str(missing))
    for read in (config.checkpoint_registry_path, config.load_checkpoint_registry, lambda: models._read_registry(None)):
        with pytest.raises(ConfigError, match=f"{CHECKPOINTS_REGISTRY_VARIABLE}={missing}: no such registry file"):
            read()


def _fake_writer(entry, folder, *, seed, reduced):
    """Writes each file as a few bytes saying its seed; reports an architecture when reduced."""
    for file_entry in entry["files"]:
        path = folder / file_entry["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"seed %d" % seed)
    return {"num_params": 10, "reduced": "width 4 -> 2" if reduced else None}


def test_make_checkpoints_places_gated_entries_by_hand(tmp_path, monkeypatch):
    registry = {"open": {"architecture": {"family": "toy"}, "files": [{"path": "a.pt"}, {"path": "sub/b.pt"}]},
                "gated": {"architecture": {"family": "toy"}, "manual": "log in and accept the licence",
                          "files": [{"path": "c.pt"}]},
                "texture": {"files": [{"path": "t.png"}]}}
    monkeypatch.setattr(run, "writers", lambda: {"toy": _fake_writer, "texture": _fake_writer})
    mirror, by_hand = tmp_path / "mirror", tmp_path / "by_hand"
    made = run.make_checkpoints(["open", "gated", "texture"], registry, mirror, seed=5, reduced={"gated": "too big"},
                                by_hand=by_hand)
    assert (mirror / "open" / "a.pt").read_bytes() == b"seed 5"
    assert (mirror / "open" / "sub" / "b.pt").read_bytes() == b"seed 5"
    assert (by_hand / "gated" / "c.pt").read_bytes() == b"seed 6"
    assert (mirror / "texture" / "t.png").read_bytes() == b"seed 7"
    assert not (mirror / "gated").exists() and sorted(p.name for p in by_hand.iterdir()) == ["gated"]
    assert {name: info["placed_by_hand"] for name, info in made.items()} == {"open": False, "gated": True,
                                                                             "texture": False}
    assert made["open"]["files"] == {"a.pt": 6, "sub/b.pt": 6} and made["open"]["bytes"] == 12
    assert made["gated"]["reduced"] == "width 4 -> 2" and made["gated"]["why_reduced"] == "too big"
    assert made["open"]["why_reduced"] is None and made["texture"]["writer"] == "texture"

    # without a by-hand folder every entry goes to the mirror
    made = run.make_checkpoints(["gated"], registry, tmp_path / "only_mirror", seed=0, reduced={})
    assert (tmp_path / "only_mirror" / "gated" / "c.pt").is_file() and made["gated"]["placed_by_hand"] is False


def test_make_checkpoints_refuses_an_entry_without_a_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "writers", lambda: {"toy": _fake_writer})
    with pytest.raises(run.RehearsalError, match=r"checkpoint 'texture' \(texture\): no rehearsal writer .*known: toy"):
        run.make_checkpoints(["texture"], {"texture": {"files": [{"path": "t.png"}]}}, tmp_path, seed=0, reduced={})


def test_the_mist_target_has_its_writer_in_the_merged_table():
    name = "diff_protect_mist_target"
    assert run.writer_key(name, REGISTRY[name]) == name
    from diffrobust.rehearsal.datasets import write_mist_target

    assert run.writers()[name] is write_mist_target


def test_precision_overrides_turn_every_fp16_network_to_fp32_on_the_cpu_only():
    preset_like = {"models": {"diffusion": {"source": "adm", "precision": "fp16"},
                              "classifier": {"source": "beit", "precision": "fp32"}},
                   "diffpure": {"models": {"diffusion": {"precision": "fp16"}}, "batch_size": 4},
                   "precision": "fp16"}
    assert run.precision_overrides(preset_like, "cpu") == {
        "models": {"diffusion": {"precision": "fp32"}},
        "diffpure": {"models": {"diffusion": {"precision": "fp32"}}},
        "precision": "fp32"}
    assert run.precision_overrides(preset_like, "cuda") == {}
    merged = config.deep_merge(preset_like, run.precision_overrides(preset_like, "cpu"))
    assert merged["models"]["classifier"] == {"source": "beit", "precision": "fp32"}
    assert merged["diffpure"]["batch_size"] == 4 and merged["models"]["diffusion"]["source"] == "adm"


def test_summary_rows_counts_the_claim_tables_the_summary_renders():
    from diffrobust import claims

    def row(paper, verdict):
        return claims.Claim(paper, "a claim", "0.5", "Table 1", "0.4", 0.4, 0.3, 0.5, verdict, "", False)

    placeholder = claims.not_run("RDC", "every claim of RDC", claims.NOT_KNOWN, "",
                                 "this preset's reports do not include rdc_table", headline=False)
    page = ("<html>" + claims.html_table([row("DensePure", claims.HOLDS), row("DensePure", claims.FAILS)])
            + claims.html_table([row("DiffPure", claims.INCONCLUSIVE)]) + claims.html_table([placeholder]) + "</html>")
    found = run.summary_rows(page, ["densepure_table1", "diffpure_table"])
    assert found["rows_per_table"] == [2, 1, 1] and found["rows"] == 4 and found["tables"] == 3
    assert found["verdicts"] == {"holds": 1, "fails": 1, "inconclusive": 1, "not": 1}
    assert found["missing_reports"] == []
    # the preset asked for the RDC table and the summary did not get it
    assert run.summary_rows(page, ["rdc_table"])["missing_reports"] == ["rdc_table"]
