"""The analysis notebooks execute top to bottom (nbclient, the venv's kernel) and save their figures;
the plotting helpers they share with the CLI read metrics files robustly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lightning_opd.errors import InputError
from lightning_opd.reporting import plots

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELL_TIMEOUT_S = 120


def _kernel_name(tmp_path: Path, monkeypatch) -> str:
    """'python3' when it launches this interpreter (the venv's), else a kernelspec written for it."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    except NoSuchKernel:
        argv0 = None
    # jupyter_client replaces a bare "python"/"python3" with sys.executable when it launches a kernel.
    bare = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    if argv0 in bare or (argv0 and Path(argv0).resolve() == Path(sys.executable).resolve()):
        return "python3"
    spec = tmp_path / "jupyter" / "kernels" / "lopd-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "lopd test", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "lopd-test"


def _execute(name: str, kernel: str):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name=kernel, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error
    return notebook


def _text_outputs(notebook) -> str:
    chunks = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            chunks.append(output.get("text", ""))
            chunks.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(chunks)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture
def notebook_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return _kernel_name(tmp_path, monkeypatch)


def _write_metrics(run: Path, *, steps: int, loss0: float, torn: bool = False) -> Path:
    run.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "loss": loss0 / step,
            "horizon": 8,
            "adv_mean": -0.1,
            "kl_student_teacher": 0.5 / step,
            "grad_norm": 1.0,
            "tokens_per_s": 1000.0,
            "elapsed_s": 0.5 * step,
        }
        if step % 3 == 0 or step == steps:
            row["eval_accuracy"] = min(1.0, 0.1 * step)
        rows.append(json.dumps(row))
    text = "\n".join(rows) + "\n" + ('{"step": 99, "lo' if torn else "")
    (run / plots.METRICS_FILE).write_text(text)
    return run


def test_store_analysis_notebook_runs_on_a_real_store(micro_store, notebook_env, tmp_path, monkeypatch):
    out = tmp_path / "figures"
    monkeypatch.setenv("LOPD_STORE", str(micro_store))
    monkeypatch.setenv("LOPD_PLOTS_DIR", str(out))
    notebook = _execute("store_analysis.ipynb", notebook_env)
    for name in ("lengths", "rates", "positions", "advantage"):
        assert _is_png(out / f"{name}.png"), name
    text = _text_outputs(notebook)
    assert "'truncated':" in text and "tokens, mean advantage" in text
    assert not list(micro_store.rglob("*.png"))  # nothing written into the store


def test_training_runs_notebook_plots_several_runs(notebook_env, tmp_path, monkeypatch):
    first = _write_metrics(tmp_path / "runs" / "a" / "opd", steps=7, loss0=2.0)
    second = _write_metrics(tmp_path / "runs" / "b" / "opd", steps=5, loss0=3.0, torn=True)
    out = tmp_path / "figures"
    monkeypatch.setenv("LOPD_RUNS", f"{first},{second / plots.METRICS_FILE}")
    monkeypatch.setenv("LOPD_PLOTS_DIR", str(out))
    notebook = _execute("training_runs.ipynb", notebook_env)
    assert _is_png(out / "loss.png") and _is_png(out / "eval_accuracy.png")
    text = _text_outputs(notebook)
    assert "a/opd: 7 steps" in text and "b/opd: 5 steps" in text  # torn last line skipped


# ---------------------------------------------------------------------------------------------
# Helpers shared with the CLI
# ---------------------------------------------------------------------------------------------


def test_read_metrics_skips_a_torn_tail_but_not_damage(tmp_path):
    run = _write_metrics(tmp_path / "run", steps=4, loss0=1.0, torn=True)
    rows = plots.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["eval_accuracy"] == pytest.approx(0.3)
    path = run / plots.METRICS_FILE
    path.write_text("{}\nnot json\n{}\n")
    with pytest.raises(InputError, match="line 2"):
        plots.read_metrics(path)
    with pytest.raises(InputError, match="no metrics.jsonl"):
        plots.read_metrics(tmp_path / "missing")


def test_run_labels_are_unique():
    runs = ["x/a/opd", "x/b/opd/metrics.jsonl", "x/solo"]
    assert [plots.run_label(r, runs) for r in runs] == ["a/opd", "b/opd", "solo"]


def test_plot_commands_write_pngs(micro_store, tmp_path):
    runs = [_write_metrics(tmp_path / name, steps=3, loss0=1.0) for name in ("r1", "r2")]
    assert plots.main(["runs", *map(str, runs), "--out", str(tmp_path / "runs_png")]) == 0
    assert _is_png(tmp_path / "runs_png" / "loss.png") and _is_png(
        tmp_path / "runs_png" / "eval_accuracy.png"
    )
    assert plots.main(["runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    from conftest import run_lopd

    printed = run_lopd("store", "plot", micro_store, "--out", tmp_path / "store_png").stdout.split()
    assert sorted(Path(p).name for p in printed) == [
        "advantage.png",
        "lengths.png",
        "positions.png",
        "rates.png",
    ]
    assert all(_is_png(Path(p)) for p in printed)
