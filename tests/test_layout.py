"""The package layout rule of DEVELOPERS.md: library code never imports the workflow stages or the command line.

`stages/` (one module per paper) and `cli` compose the library; if a library module imported them, the library
would depend on workflow plumbing and the next paper's code would start reaching into the last one's jobs.
`rehearsal/` is workflow side too: it writes a preset's files, runs its whole DAG and projects the preset's jobs
(it reads the stages' plan), so no library module may import it either."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffrobust"
WORKFLOW_SIDE = ("diffrobust.stages", "diffrobust.cli", "diffrobust.__main__", "diffrobust.rehearsal")


def imported_modules(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_library_modules_never_import_stages_or_cli():
    library = [path for path in PACKAGE.rglob("*.py")
               if path.parts[len(PACKAGE.parts)] not in ("stages", "rehearsal", "cli.py", "__main__.py")]
    assert len(library) > 20
    offenders = {str(path.relative_to(PACKAGE)): sorted(name for name in imported_modules(path)
                                                       if name.startswith(WORKFLOW_SIDE))
                 for path in library}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_every_concept_has_its_package():
    for package in ("networks", "defenses", "attacks", "stages", "bench"):
        assert (PACKAGE / package / "__init__.py").is_file(), package


def test_the_gpu_count_of_the_dag_build_respects_cuda_visible_devices(monkeypatch):
    from diffrobust.gpus import visible_nvidia_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_nvidia_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_nvidia_gpus() == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import glob
    assert visible_nvidia_gpus() == len(glob.glob("/dev/nvidia[0-9]*"))
