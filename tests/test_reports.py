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


# --- the digests of a report's inputs (issue 21, item 6) ------------------------------------------------------------

SET_NOTEBOOK = '''# %% tags=["parameters"]
set_path = ""
replace = False

# %%
from pathlib import Path

print("rdc robust accuracy", Path(set_path).read_text())

# %%
if replace:  # another run's job replacing the set between two cells of this render
    Path(set_path + ".new").write_text("0.000")
    Path(set_path + ".new").replace(set_path)
'''


def _set_report(tmp_path):
    notebook, rdc_set = tmp_path / "table.py", tmp_path / "rdc_set.txt"
    notebook.write_text(SET_NOTEBOOK)
    rdc_set.write_text("1.000")
    return notebook, rdc_set


def test_a_render_records_the_sha256_of_each_input_in_the_report(tmp_path):
    import hashlib

    notebook, rdc_set = _set_report(tmp_path)
    digests = render_notebook(notebook, {"set_path": str(rdc_set)}, tmp_path / "r.ipynb", tmp_path / "r.html",
                              cwd=tmp_path, inputs=[str(notebook), str(rdc_set)])
    expected = {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in (notebook, rdc_set)}
    assert digests == expected
    html = (tmp_path / "r.html").read_text()
    assert "Inputs of this report" in html and "rdc robust accuracy 1.000" in html
    for file, digest in expected.items():  # the table at the end: each input beside its digest
        assert f"<td><code>{file}</code></td>\n<td><code>{digest}</code></td>" in html
    assert html.index("Inputs of this report") > html.index("rdc robust accuracy")


def test_an_input_replaced_during_the_render_fails_it_naming_the_file_and_leaves_no_report(tmp_path):
    from diffrobust.reports import InputsChangedError

    notebook, rdc_set = _set_report(tmp_path)
    reports = tmp_path / "reports"
    with pytest.raises(InputsChangedError, match=f"{rdc_set} changed while {reports / 'r.html'} was being rendered"):
        render_notebook(notebook, {"set_path": str(rdc_set), "replace": True}, reports / "r.ipynb",
                        reports / "r.html", cwd=tmp_path, inputs=[str(notebook), str(rdc_set)])
    assert rdc_set.read_text() == "0.000"  # the set did change
    assert list(reports.iterdir()) == []  # no HTML, no executed notebook, no temporary file


def test_the_cli_records_the_input_digests_in_the_run_record_and_refuses_a_changed_input(tmp_path, capsys):
    import json

    from diffrobust.cli import main
    from diffrobust.download import file_digest

    notebook, rdc_set = _set_report(tmp_path)
    record = tmp_path / "logs/r.run.json"
    arguments = ["render-notebook", "--notebook", str(notebook), "--ipynb", str(tmp_path / "r.ipynb"),
                 "--html", str(tmp_path / "r.html"), "--inputs", str(notebook), str(rdc_set), "--run-record", str(record)]
    assert main([*arguments, "--parameters", json.dumps({"set_path": str(rdc_set)})]) == 0
    first = json.loads(record.read_text())
    assert first["inputs"] == {str(notebook): file_digest(notebook), str(rdc_set): file_digest(rdc_set)}
    assert first["changed_since_last_render"] is None  # no earlier render

    rdc_set.write_text("0.500")  # changed between two renders: the next record says which input changed
    assert main([*arguments, "--parameters", json.dumps({"set_path": str(rdc_set)})]) == 0
    assert json.loads(record.read_text())["changed_since_last_render"] == [str(rdc_set)]

    previous_html, previous_record = (tmp_path / "r.html").read_text(), record.read_text()
    assert main([*arguments, "--parameters", json.dumps({"set_path": str(rdc_set), "replace": True})]) == 1
    message = capsys.readouterr().err
    assert f"diffrobust render-notebook: error: {rdc_set} changed while {tmp_path / 'r.html'} was being rendered" in message
    assert "Traceback" not in message
    # the half-made outputs are gone; what was there before the refused render is left as it was (as after a
    # failed notebook), and the refused render writes no run record
    assert (tmp_path / "r.html").read_text() == previous_html and "rdc robust accuracy 0.500" in previous_html
    assert record.read_text() == previous_record
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
