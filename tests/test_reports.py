"""Notebook rendering: parameters injected by papermill, HTML without code, the data report's content."""

import pytest
import yaml

from diffrobust import data
from diffrobust.download import file_digest
from diffrobust.reports import parameter_names, render_notebook


def test_data_report_notebook_declares_its_parameters(repo_root):
    assert parameter_names(repo_root / "notebooks" / "data_report.py") == [
        "preset", "description", "dataset_dir", "subsets", "checkpoint_names", "checkpoint_lock"]


def test_render_data_report(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data.prepare_mnist(tmp_path / "mnist", test_per_class=10)
    # one registry file present and recorded in a lock, the other missing
    checkpoint = tmp_path / "data/checkpoints/vit_b16_cifar10/config.json"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("{}")
    lock = tmp_path / "lock.yaml"
    lock.write_text(yaml.safe_dump({"vit_b16_cifar10/config.json": {"sha256": file_digest(checkpoint)}}))
    parameters = {"preset": "testpreset", "description": "a test", "dataset_dir": str(tmp_path / "mnist"),
                  "subsets": {"densepure": {"start": 0, "stop": 100, "step": 20}},
                  "checkpoint_names": ["vit_b16_cifar10"], "checkpoint_lock": str(lock)}
    render_notebook(repo_root / "notebooks" / "data_report.py", parameters, tmp_path / "r.ipynb", tmp_path / "r.html",
                    cwd=tmp_path)
    html = (tmp_path / "r.html").read_text()
    assert "testpreset" in html  # parameters injected
    assert "Splits: images per class" in html
    assert "recorded sha256" in html and "missing" in html
    assert "from diffrobust" not in html  # code cells are hidden
    assert "<img" in html  # the sample grid
    assert sorted(tmp_path.glob(".r.*")) == []  # no temporary files left


def test_unknown_notebook_parameter_is_refused_before_running(tmp_path, repo_root):
    with pytest.raises(ValueError, match="unknown notebook parameters \\['sigma'\\]"):
        render_notebook(repo_root / "notebooks" / "data_report.py", {"sigma": 0.5}, tmp_path / "x.ipynb",
                        tmp_path / "x.html")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_render_leaves_the_previous_report_as_it_was(tmp_path):
    notebook = tmp_path / "broken.py"
    notebook.write_text('# %% tags=["parameters"]\nx = 1\n\n# %%\nraise RuntimeError(f"broken on purpose {x}")\n')
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "r.html").write_text("the previous report")
    (reports / "r.ipynb").write_text("the previous notebook")
    with pytest.raises(Exception, match="broken on purpose 2"):
        render_notebook(notebook, {"x": 2}, reports / "r.ipynb", reports / "r.html", cwd=tmp_path)
    assert (reports / "r.html").read_text() == "the previous report"
    assert (reports / "r.ipynb").read_text() == "the previous notebook"
    assert sorted(path.name for path in reports.iterdir()) == ["r.html", "r.ipynb"]  # no temporary file left
