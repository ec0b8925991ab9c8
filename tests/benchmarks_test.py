"""The throughput benchmark's --quick mode runs on CPU and writes a complete JSON table."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_throughput_benchmark_writes_a_complete_table(tmp_path):
  out = tmp_path / "t.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--quick",
                         "--models=vit_test", "--dtypes=float32",
                         "--methods=vmap,ghost", "--scans=1", "--breakdown", f"--out={out}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  rows = json.loads(out.read_text())["rows"]
  assert [(r["model"], r["per_example"], r["scan"]) for r in rows] == [
      ("vit_test", "vmap", 1), ("vit_test", "ghost", 1)]
  for row in rows:
    assert "failed" not in row
    assert row["dp_examples_per_s"] > 0 and row["non_dp_examples_per_s"] > 0
    ratio = row["dp_examples_per_s"] / row["non_dp_examples_per_s"]
    assert abs(row["dp_over_non_dp"] - ratio) < 1e-9
    assert row["peak_memory_mb"] > 0 and row["dp_compile_s"] >= 0
    pieces = {"public_grad_ms", "accumulate_ms"} | (
        {"ghost_backward_ms", "ghost_norms_ms"} if row["per_example"] == "ghost" else set())
    assert set(row["pieces"]) == pieces and min(row["pieces"].values()) > 0
  assert "| vit_test | flat | ghost | float32 | fused | yes |" in done.stdout
