"""Benchmark tables and charts: the CSV holds every row and the PNG is written beside it."""

import csv

from lightning_opd.reporting.plots import write_benchmark


def test_write_benchmark_bar_and_line(tmp_path):
    rows = [{"vocab": 32768, "naive": 268.0, "ours": 32.0}, {"vocab": 65536, "naive": 524.0, "ours": 57.0}]
    csv_path, png = write_benchmark(
        tmp_path,
        "mem",
        rows,
        x="vocab",
        ys=["naive", "ours"],
        kind="line",
        logx=True,
        title="t",
        ylabel="MiB",
    )
    with open(csv_path) as f:
        back = list(csv.DictReader(f))
    assert [float(r["ours"]) for r in back] == [32.0, 57.0] and png.read_bytes()[:4] == b"\x89PNG"
    csv_path, png = write_benchmark(
        tmp_path, "bars", [{"step": "SFT", "ratio": 1.0}], x="step", ys=["ratio"], title="t", ylabel="x"
    )
    assert csv_path.read_text().splitlines() == ["step,ratio", "SFT,1.0"] and png.exists()
