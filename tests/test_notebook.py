"""notebooks/quickstart.ipynb runs top to bottom (CI executes it so it cannot rot)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    env_backup = dict(os.environ)
    os.environ.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "def read_config(path):" in text and "jaxmodels vs transformers" in text and "per device" in text


@pytest.mark.slow
def test_install_cell_installs_like_colab(tmp_path):
    """The notebook's install cell on a runtime without jaxmodels, as far as a machine without network allows:
    a fresh virtualenv that sees this environment's packages (jax, torch, transformers: what Colab ships)
    but not jaxmodels, the working directory an empty /content, JAXMODELS_SOURCE this checkout instead of the
    repository URL. The cell installs the package (not a clone that would shadow it), the embedded model
    generates from the installed copy, and running the cell again skips the install."""
    import glob
    import json
    import site
    import subprocess
    import sys

    nb = json.load(open(os.path.join(ROOT, "notebooks", "quickstart.ipynb")))
    cell = "".join(nb["cells"][1]["source"])
    assert "JAXMODELS_SOURCE" in cell and "-e" not in cell.split() and "[test]" not in cell
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    (target,) = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
    # This environment's packages, but not its editable jaxmodels (its finder is a .pth this path does not run).
    with open(os.path.join(target, "outer.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    content = tmp_path / "content"
    content.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(JAXMODELS_SOURCE=ROOT, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    probe = subprocess.run([python, "-c", "import importlib.util; print(importlib.util.find_spec('jaxmodels'))"],
                           cwd=content, env=env, capture_output=True, text=True, timeout=300)
    if probe.stdout.strip() != "None":
        pytest.skip("jaxmodels is installed non-editable here, so a fresh runtime cannot be imitated")
    for attempt in ("install", "skip"):
        proc = subprocess.run([python, "-c", cell], cwd=content, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (attempt, proc.stdout[-2000:], proc.stderr[-3000:])
        assert f"from {os.path.join(target, 'jaxmodels')}" in proc.stdout, (attempt, proc.stdout)
    assert os.listdir(content) == []  # nothing cloned into the working directory
    proc = subprocess.run([str(venv / "bin" / "jaxmodels"), "generate", "--max-new-tokens", "4"], cwd=content, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("def fib(n):"), proc.stderr[-3000:]
