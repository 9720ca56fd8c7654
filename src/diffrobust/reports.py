"""Render a paper-table notebook: jupytext source -> papermill (parameters injected) -> HTML without code cells.

Notebooks live in notebooks/ as jupytext percent scripts (reviewable diffs); each has one cell tagged
`parameters` whose defaults let it run standalone on the mini preset.

A report names the bytes it was made from: the sha256 of every input file is taken before the notebook runs and
listed in a table at the end of the report (and returned for the run record). The inputs are hashed again once the
HTML is made; if one changed while the notebook ran (a job of another run replaced a set between two cells), the
report could show half old and half new numbers, so the render is refused (`InputsChangedError`, naming the file)
and neither output is written."""

from pathlib import Path

from diffrobust.errors import DiffrobustError
from diffrobust.io import atomic_path
from diffrobust.provenance import changed_files, file_digests


class InputsChangedError(DiffrobustError):
    """An input file of a report changed while the report was rendered."""

KERNEL_METADATA = {
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
}


def load_notebook(source):
    """Read a jupytext script (or .ipynb) and give it the kernel metadata papermill needs."""
    import jupytext

    notebook = jupytext.read(source)
    for key, value in KERNEL_METADATA.items():
        notebook.metadata.setdefault(key, value)
    return notebook


def parameter_names(source):
    """Names assigned in the cell tagged `parameters` (what papermill may override)."""
    import ast

    notebook = load_notebook(source)
    for cell in notebook.cells:
        if "parameters" in cell.metadata.get("tags", []):
            tree = ast.parse(cell.source)
            return [target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets]
    raise ValueError(f"{source}: no cell is tagged 'parameters'")


def provenance_cell(digests):
    """A markdown cell listing each input file of the report and its sha256 (the report's last cell)."""
    import nbformat

    rows = "\n".join(f"| `{file}` | `{digest}` |" for file, digest in sorted(digests.items()))
    return nbformat.v4.new_markdown_cell(
        "## Inputs of this report\n\nThe files this report was rendered from, with the sha256 of their content when "
        "the render started (they were hashed again at its end and were unchanged).\n\n"
        f"| file | sha256 |\n|---|---|\n{rows}\n")


def input_digests(inputs):
    """{file: sha256} of the report's `inputs` (files or folders); an input that does not exist is an error."""
    missing = [str(path) for path in inputs if not Path(path).exists()]
    if missing:
        raise DiffrobustError(f"input {missing[0]} of the report does not exist: pass the files the notebook reads "
                              "(--inputs), as the workflow does")
    return file_digests(inputs)[0]


def check_inputs_unchanged(inputs, digests, html_out):
    """Raise InputsChangedError if the files behind `inputs` now differ from `digests` (taken before the render):
    a file rewritten, replaced, removed, or new in an input folder."""
    changed = changed_files(digests, file_digests([path for path in inputs if Path(path).exists()])[0])
    if changed:
        raise InputsChangedError(
            f"{changed[0]} changed while {html_out} was being rendered"
            + (f" (and {len(changed) - 1} more: {', '.join(changed[1:])})" if len(changed) > 1 else "")
            + ": the report would mix numbers of its old and new content, so it was not written. Run the render "
              "again (snakemake renders it again) once nothing else writes that file.")


def render_notebook(source, parameters, ipynb_out, html_out, cwd=None, kernel="python3", inputs=()):
    """Execute `source` with `parameters` and write the executed notebook and its code-free HTML, atomically; return
    {file: sha256} of the `inputs` (files or folders) it was rendered from, also listed at the end of the report.

    Both are rendered to temporary files and renamed into place only when the whole render succeeded, so a
    notebook that fails leaves the previous report (if any) as it was. (The render_report rule flags the HTML
    update() so that Snakemake does not delete it before the job either.) An input that changed during the render
    fails it the same way (InputsChangedError, see the module docstring)."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    unknown = sorted(set(parameters) - set(parameter_names(source)))
    if unknown:
        raise ValueError(f"{source}: unknown notebook parameters {unknown}; the parameters cell defines {parameter_names(source)}")
    notebook = load_notebook(source)
    digests = input_digests(inputs)
    with atomic_path(ipynb_out) as executed_path:
        papermill.execute_notebook(
            notebook,
            str(executed_path),
            parameters=parameters,
            kernel_name=kernel,
            cwd=str(cwd or Path.cwd()),
            progress_bar=False,
            log_output=True,
        )
        executed = nbformat.read(executed_path, as_version=4)
        if digests:
            executed.cells.append(provenance_cell(digests))
            nbformat.write(executed, executed_path)
        exporter = HTMLExporter()
        exporter.exclude_input = True
        exporter.exclude_input_prompt = True
        exporter.exclude_output_prompt = True
        html, _ = exporter.from_notebook_node(executed)
        with atomic_path(html_out) as html_path:
            html_path.write_text(html)
            check_inputs_unchanged(inputs, digests, html_out)
    return digests
