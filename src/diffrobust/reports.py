"""Render a paper-table notebook: jupytext source -> papermill (parameters injected) -> HTML without code cells.

Notebooks live in notebooks/ as jupytext percent scripts (reviewable diffs); each has one cell tagged
`parameters` whose defaults let it run standalone on the mini preset."""

from pathlib import Path

from diffrobust.io import atomic_path

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


def render_notebook(source, parameters, ipynb_out, html_out, cwd=None, kernel="python3"):
    """Execute `source` with `parameters` and write the executed notebook and its code-free HTML, atomically.

    Both are rendered to temporary files and renamed into place only when the whole render succeeded, so a
    notebook that fails leaves the previous report (if any) as it was. (The render_report rule flags the HTML
    update() so that Snakemake does not delete it before the job either.)"""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    unknown = sorted(set(parameters) - set(parameter_names(source)))
    if unknown:
        raise ValueError(f"{source}: unknown notebook parameters {unknown}; the parameters cell defines {parameter_names(source)}")
    notebook = load_notebook(source)
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
        exporter = HTMLExporter()
        exporter.exclude_input = True
        exporter.exclude_input_prompt = True
        exporter.exclude_output_prompt = True
        html, _ = exporter.from_notebook_node(executed)
        with atomic_path(html_out) as html_path:
            html_path.write_text(html)
