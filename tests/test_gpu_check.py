"""bench/gpu_check.py in its dry mode (CPU, toy sizes, nothing launched): the arguments parse, every
part builds its models and runs, and the one dated table comes out (the GPU run is the same code)."""
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_prints_one_dated_table_with_a_row_per_check(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    gpu_check.main(["--dry-run", "--steps", "1", "--out", str(tmp_path / "benchmarks.md")])
    out = capsys.readouterr().out
    table = out[out.index("### GPU check"):]
    assert re.match(r"### GPU check, \d{4}-\d\d-\d\d \d\d:\d\d UTC: CPU \(dry run", table)
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {row[0].removeprefix("| ") for row in rows} == {
        "requirements", "norms vs oracle", "clipped sum vs oracle", "collectives", "launch DDP-style", "launch ZeRO-3", "speed 1B full", "speed 8B LoRA r=16 q,k,v,o"}
    assert all(row[2] in ("ok", "dry run") for row in rows), table
    assert len([row for row in rows if row[0].startswith("| speed")]) == 6  # non-private, bk, ghost × 2 models
    assert (tmp_path / "benchmarks.md").read_text().strip() == table.strip()
