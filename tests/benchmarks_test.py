"""The benchmarks run on CPU and write rows of the one format (`benchmarks.schema`); the results
table is what the archive gives, and the README shows its current rows."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import convert_results, report_table, schema, targets, throughput

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_throughput_benchmark_writes_a_complete_table(tmp_path):
  out = tmp_path / "t.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--quick",
                         "--models=vit_test", "--dtypes=float32",
                         "--methods=vmap,ghost", "--scans=1", "--breakdown", f"--out={out}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  written = json.loads(out.read_text())
  assert written["format"] == schema.FORMAT and written["failed"] == []
  rows = schema.validate_table(written["rows"])
  assert [(r["model"], r["mode"], r["method"], r["run"]) for r in rows] == [
      ("vit_test", "nondp", None, 0), ("vit_test", "dp", "vmap", 0),
      ("vit_test", "nondp", None, 1), ("vit_test", "dp", "ghost", 1)]
  for i, row in enumerate(rows):
    assert row["source"] == f"{out}#/rows/{i}" and row["date"]
    assert row["details"]["scan"] == 1 and row["batch"] == 16
    assert {"quick", "scan_blocks"} <= set(row["variant"].split("; "))
    assert row["examples_per_s"] > 0 and row["compile_s"] >= 0 and row["peak_memory_bytes"] > 0
    # dispatching a window's steps is a part of its time
    assert 0 < row["details"]["dispatch_ms"] <= row["details"]["step_ms"]
  for nondp, dp in zip(rows[::2], rows[1::2]):
    assert (dp["microbatch"], dp["microbatches"], nondp["microbatch"]) == (8, 2, 16)
    ratio = dp["examples_per_s"] / nondp["examples_per_s"]
    assert abs(dp["dp_over_non_dp"] - ratio) < 1e-9
    pieces = {"public_grad_ms", "accumulate_ms", "noise_ms"} | (
        {"ghost_backward_ms", "ghost_norms_ms"} if dp["method"] == "ghost" else set())
    assert set(dp["details"]["pieces"]) == pieces and min(dp["details"]["pieces"].values()) > 0
    # the default attention, and the kernel it took on this CPU
    assert (dp["details"]["attention"], dp["details"]["attention_kernel"]) == ("auto", "xla")
  assert "| vit_test | flat | ghost | float32 | auto | yes |" in done.stdout


def _fake_run_row(measured):
  """A stand-in for `rows.run_row` that returns `measured(flags)` without a subprocess."""
  return lambda module, flags, config, env=None: measured(flags)


def test_scaling_writes_a_dp_and_a_nondp_row_per_layout(tmp_path, monkeypatch):
  """The parent process's rows from its layouts' measurements (a stand-in for the subprocess:
  the archived H200 rows in the keys run_one writes now)."""
  from benchmarks import rows, scaling
  archived = json.loads((convert_results.RESULTS / "archive/scaling_h200x2.json").read_text())
  by_layout = {f"{r['data']}x{r['fsdp']}": dict(
      r, dp_peak_memory_bytes=2**30, non_dp_peak_memory_bytes=2**29, dp_compile_s=30.0,
      non_dp_compile_s=10.0) for r in archived["rows"]}
  monkeypatch.setattr(rows, "run_row", _fake_run_row(lambda flags: by_layout[flags[1]]))
  out = tmp_path / "s.json"
  monkeypatch.setattr(sys, "argv", ["scaling", "--layouts=1x1,2x1,1x2", "--commit=abc1234",
                                    f"--out={out}"])
  scaling.main()
  table = schema.validate_table(json.loads(out.read_text())["rows"])
  assert [(r["mesh"], r["mode"]) for r in table] == [
      (m, mode) for m in ("1x1", "2x1", "1x2") for mode in ("nondp", "dp")]
  for nondp, dp in zip(table[::2], table[1::2]):
    assert dp["commit"] == "abc1234" and dp["peak_memory_bytes"] == 2**30
    assert dp["microbatch"] == 32 * dp["details"]["devices"] and dp["microbatches"] == 4
    assert nondp["batch"] == dp["batch"] and nondp["compile_s"] == 10.0


def test_dp_step_writes_a_dp_and_a_nondp_row_per_model(tmp_path, monkeypatch):
  from benchmarks import dp_step, rows
  archived = json.loads((convert_results.RESULTS / "archive/dp_step_cpu.json").read_text())
  by_run = {(r["model"], r["mode"]): dict(r, peak_memory_bytes=2**28) for r in archived["rows"]}
  monkeypatch.setattr(rows, "run_row", _fake_run_row(
      lambda flags: by_run[tuple(flags[1].split(":"))]))
  out = tmp_path / "d.json"
  monkeypatch.setattr(sys, "argv", ["dp_step", "--models=cnn_tanh_mnist,vit_mini_32",
                                    f"--out={out}"])
  dp_step.main()
  table = schema.validate_table(json.loads(out.read_text())["rows"])
  assert [(r["model"], r["mode"]) for r in table] == [
      (m, mode) for m in ("cnn_tanh_mnist", "vit_mini_32") for mode in ("nondp", "dp")]
  assert all(r["microbatch"] * r["microbatches"] == 256 for r in table)


def test_a_failed_configuration_is_a_row_naming_its_exception(tmp_path, monkeypatch):
  """A configuration that fails in its subprocess leaves a row with the exception line (not the
  notes JAX appends after it), and the table's JSON is written all the same."""
  from benchmarks import rows
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("PYTHONPATH", str(ROOT))
  row = rows.run_row("benchmarks.max_batch", ["--model=no_such_model", "--per_example=vmap"],
                     dict(model="no_such_model"))
  assert row["model"] == "no_such_model" and row["failed"].startswith("KeyError")
  out = tmp_path / "rows.json"
  rows.write_rows(str(out), "benchmarks.max_batch", [row])
  assert json.loads(out.read_text())["rows"] == [row]
  rows.write_table(str(out), "benchmarks.throughput", [], [row])
  assert json.loads(out.read_text())["failed"] == [row]
  assert rows.failure("Traceback ...\nValueError: bad\n--------\nnote") == "ValueError: bad"


def test_profile_names_kernels_after_the_dumped_hlo(tmp_path):
  """A kernel of the trace is matched to its HLO instruction (fusion_12 -> %fusion.12) in XLA's
  optimized-HLO dump, which gives its shape and the JAX op it came from."""
  from benchmarks import profile
  (tmp_path / "module_0001.jit_step.sm_9.0_gpu_after_optimizations.txt").write_text(
      '  %fusion.12 = f32[8,197,197]{2,1,0} fusion(%p0, %p1), kind=kCustom, '
      'metadata={op_name="jit(accumulate)/ghost/gram" source_file="x.py"}\n'
      '  ROOT %copy.3 = bf16[4]{0} copy(%p2), metadata={op_name="jit(step)/copy"}\n')
  (tmp_path / "module_0002.jit_other.sm_9.0_gpu_after_optimizations.txt").write_text(
      '  %fusion.12 = f32[2]{0} fusion(%p0), metadata={op_name="jit(other)/x"}\n')
  kernels = profile.annotate(
      [dict(name="fusion_12", hlo_op="", module="jit_step"),
       dict(name="k", hlo_op="copy.3", module="jit_step"),
       dict(name="unknown", hlo_op="", module="jit_step"),
       dict(name="fusion_12", hlo_op="", module="jit_other")], str(tmp_path))
  assert kernels[0]["source"] == "f32[8,197,197]{2,1,0} jit(accumulate)/ghost/gram"
  assert kernels[1]["source"] == "bf16[4]{0} jit(step)/copy"
  assert "source" not in kernels[2]
  assert kernels[3]["source"] == "f32[2]{0} jit(other)/x"
  assert "--xla_dump_to=/d" in profile.dump_flags("/d")


def test_scan_variants_benchmark_writes_a_row_per_variant(tmp_path):
  out = tmp_path / "s.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "-m", "benchmarks.scan_variants", "--model=vit_test",
                         "--variants=unrolled,scan", "--batch=4", "--steps=1", "--windows=1",
                         f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["unrolled", "scan"]
  assert all(r["step_ms"] > 0 and r["compile_s"] > 0 for r in rows)


def test_summed_terms_variants_agree(tmp_path):
  """Every formulation times the same norm and weighted sum (they agree to float32 rounding)."""
  from benchmarks import summed_terms
  out = tmp_path / "t.json"
  done = subprocess.run([sys.executable, "-m", "benchmarks.summed_terms", "--shape=4x5x6",
                         "--steps=1", "--windows=1", f"--out={out}"], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == list(summed_terms.VARIANTS)
  assert all(r["ms"] > 0 and r["max_rel_error"] < 1e-5 for r in rows)


def test_affine_max_extrapolates_the_line_through_two_sizes():
  from benchmarks.max_batch import affine_max
  points = {8: 100 + 8 * 10, 16: 100 + 16 * 10}  # 100 fixed + 10 per row
  assert affine_max(points, budget=100 + 57 * 10, multiple=8) == 56
  assert affine_max(points, budget=100 + 64 * 10, multiple=8) == 64
  assert affine_max(points, budget=50, multiple=8) == 0
  with pytest.raises(ValueError, match="does not grow"):
    affine_max({8: 10, 16: 10}, budget=100, multiple=8)


def test_max_batch_benchmark_finds_sizes_that_fit(tmp_path):
  """Each largest size is a multiple of --multiple whose compiled step XLA says fits (the small
  CNN, ghost only: each size is a compile)."""
  out = tmp_path / "m.json"
  done = subprocess.run([sys.executable, "-m", "benchmarks.max_batch", "--models=cnn_tanh",
                         "--methods=ghost", "--probes=4,8", "--limit_mb=64", "--multiple=4",
                         f"--out={out}"], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  (row,) = json.loads(out.read_text())["rows"]
  budget = row["limit_mb"] * row["fraction"]
  for name in ("dp", "non_dp"):
    assert row[f"{name}_max_rows"] > 8 and row[f"{name}_max_rows"] % 4 == 0
    assert row[f"{name}_mb_at_max"] <= budget


def test_compile_time_benchmark_sums_the_compiles_host_events(tmp_path):
  """One row per XLA_FLAGS variant, with the variant's flags in force and XLA's own compile
  events (the small CNN, ghost: one compile per variant)."""
  out = tmp_path / "c.json"
  done = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--model=cnn_tanh",
                         "--microbatch=4", "--events", "--variants=baseline=;two_threads="
                         "--xla_cpu_parallel_codegen_split_count=2", f"--out={out}"], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["baseline", "two_threads"]
  assert rows[1]["xla_flags"].endswith("--xla_cpu_parallel_codegen_split_count=2")
  for row in rows:
    assert row["dp_s"] > row["pieces"]["accumulate"]["compile_s"] > 0
    assert row["pieces"]["accumulate"]["hlo_lines"] > 100
    # Ghost clipping does more arithmetic than the plain gradient (the per-example norms).
    assert row["pieces"]["accumulate"]["flops"] > 0
    assert row["accumulate_over_public_grad_flops"] > 1.0
    for piece in ("accumulate", "apply_dp"):
      names = [event["name"] for event in row["host_events"][piece]]
      assert any("Compile" in name for name in names), (piece, names)


def _pair(run=0, variant=None, clip="flat", dp_rate=50.0, source="runs/x.json", **shared):
  return schema.pair_rows(
      dict(benchmark="throughput", model="vit_test", dtype="float32", mesh="1x1", device="cpu",
           commit=None, date=None, variant=variant, command="python -m benchmarks.throughput",
           run=run, **shared),
      dict(microbatch=16, examples_per_s=100.0, compile_s=None, peak_memory_bytes=None,
           source=f"{source}#/rows/{2 * run}", details={}),
      dict(microbatch=8, microbatches=2, method="ghost", clip=clip, examples_per_s=dp_rate,
           compile_s=1.0, peak_memory_bytes=2**20, source=f"{source}#/rows/{2 * run + 1}",
           details={}))


def test_table_schema_rejects_rows_that_break_it():
  nondp, dp = _pair()
  assert dp["dp_over_non_dp"] == 0.5 and dp["batch"] == 16 and nondp["microbatches"] == 1
  broken = [(dict(dp, batch=17), "batch"), (dict(nondp, method="vmap"), "method"),
            (dict(dp, method="opacus"), "method"), (dict(dp, commit="HEAD"), "commit"),
            (dict(dp, peak_memory_bytes=1.5), "peak_memory_bytes"),
            (dict(dp, examples_per_s=float("nan")), "examples_per_s"),
            (dict(dp, source="x.json"), "source"), ({**dp, "speed": 1.0}, "unknown"),
            ({k: v for k, v in dp.items() if k != "mesh"}, "missing")]
  for row, field in broken:
    with pytest.raises(schema.SchemaError, match=field):
      schema.validate(row)
  with pytest.raises(schema.SchemaError, match="is not"):
    schema.validate_table([nondp, dict(dp, dp_over_non_dp=0.6)])
  with pytest.raises(schema.SchemaError, match="no nondp row"):
    schema.validate_table([dp])
  with pytest.raises(schema.SchemaError, match="two dp rows"):
    schema.validate_table([nondp, dp, dp])
  assert schema.mb_to_bytes(1.5) == 3 * 2**19
  with pytest.raises(ValueError, match="whole number"):
    schema.mb_to_bytes(1e-9)


def test_table_current_rows_are_the_last_plain_run_per_configuration():
  rows = (_pair(0, dp_rate=40.0) + _pair(1, dp_rate=50.0) + _pair(2, "profiled", dp_rate=90.0)
          + _pair(3, clip="per_layer", dp_rate=30.0))
  current = report_table.current(rows)
  assert [(dp["run"], nondp["run"], dp["clip"]) for dp, nondp in current] == [
      (1, 1, "flat"), (3, 3, "per_layer")]
  table = report_table.markdown(rows)
  assert ("| 1 | vit_test | ghost | flat | float32 | 8 × 2 | cpu | 50.0 | 100 | 0.500 | 1 | — | "
          "1.0 | — |") in table
  assert "rows 1, 2 (`runs/x.json`): `python -m benchmarks.throughput`" in table


def _h200_pair(benchmark, run, nondp_rate, dp_rate, date, device="NVIDIA H200", compile_s=20.0):
  return schema.pair_rows(
      dict(benchmark=benchmark, model="vit_b16_224", dtype="bfloat16", mesh="1x1", device=device,
           commit="abcdef1", date=date, variant=None, command="run_peers.sh", run=run),
      dict(microbatch=128, examples_per_s=nondp_rate, compile_s=None, peak_memory_bytes=None,
           source=f"runs/{benchmark}.json#/rows/{2 * run}", details={}),
      dict(microbatch=128, microbatches=1, method="ghost", clip="flat", examples_per_s=dp_rate,
           compile_s=compile_s, peak_memory_bytes=None,
           source=f"runs/{benchmark}.json#/rows/{2 * run + 1}", details={}))


def _targets_found(lines):
  return {line.split(" | ")[0][2:]: line.split(" | ")[2:4] for line in lines[4:]}


def test_targets_table_reads_the_current_rows_and_compares_peers_of_one_call_only():
  rows = (_h200_pair("throughput", 0, 3500.0, 3200.0, "2026-12-05T10:00:00+00:00")
          + _h200_pair("throughput", 1, 9000.0, 8000.0, "2026-12-05T10:00:00+00:00",
                       device="NVIDIA H100 80GB HBM3")  # another device: not a target's row
          + _h200_pair("peers.opacus_vit", 2, 3000.0, 1000.0, "2026-12-05T10:10:00+00:00")
          + _h200_pair("peers.jax_privacy_vit", 3, 3400.0, 2000.0, "2026-12-05T12:00:00+00:00"))
  lines = targets.markdown(report_table.current(rows), report_table.plain(rows))
  found = _targets_found(lines)
  assert found["ViT-B/16 224² DP examples/s"] == ["3,200", "yes"]
  assert found["ViT-B/16 224² DP ÷ non-private (same call)"] == ["0.914", "yes"]
  assert found["dpjax DP ÷ Opacus's best DP (ViT-B/16, same call)"] == ["3.20×", "yes"]
  assert found["dpjax non-private ÷ timm's non-private (same call)"] == ["1.17×", "yes"]
  # jax_privacy's row is two hours from dpjax's: not one call, so no ratio is claimed
  assert found["dpjax DP ÷ jax_privacy clipped_grad DP (same model, same call)"] == [
      "not measured", "—"]
  assert found["ViT-L/16 224² DP ÷ non-private"] == ["not measured", "—"]
  assert found["ViT-B/16 224² DP step compile s"] == ["20 s", "yes"]
  assert len(found) == len(targets.TARGETS)
  assert "\n".join(lines) in report_table.markdown(rows)


def test_a_later_dpjax_row_does_not_hide_the_last_call_that_measured_the_peers():
  peers_call = (_h200_pair("throughput", 0, 2600.0, 1900.0, "2026-12-04T10:00:00+00:00")
                + _h200_pair("peers.opacus_vit", 1, 2600.0, 950.0, "2026-12-04T10:10:00+00:00"))
  later = _h200_pair("throughput", 2, 3300.0, 2550.0, "2026-12-04T18:00:00+00:00")
  rows = peers_call + later
  found = _targets_found(targets.markdown(report_table.current(rows), report_table.plain(rows)))
  assert found["ViT-B/16 224² DP examples/s"] == ["2,550", "no"]  # the current (later) row
  assert found["dpjax DP ÷ Opacus's best DP (ViT-B/16, same call)"] == ["2.00×", "no"]
  assert found["dpjax non-private ÷ timm's non-private (same call)"] == ["1.00×", "yes"]
  # with the current rows alone, the peers' call has no dpjax row: not measured
  alone = _targets_found(targets.markdown(report_table.current(rows), report_table.current(rows)))
  assert alone["dpjax DP ÷ Opacus's best DP (ViT-B/16, same call)"] == ["not measured", "—"]


def test_an_attention_other_than_the_default_when_it_ran_is_a_variant():
  raw = dict(model="vit_b16_224", dtype="bfloat16", device="NVIDIA H200", batch=8, microbatch=8,
             microbatches=1, per_example="ghost", clip="flat", non_dp_examples_per_s=2.0,
             dp_examples_per_s=1.0, dp_over_non_dp=0.5)
  def variant(attention, date):
    rows = throughput.to_rows(dict(raw, attention=attention), run=0, sources=("a#/0", "a#/1"),
                              command="c", commit=None, date=date)
    return {r["variant"] for r in rows}
  before, after = "2026-12-03T10:00:00+00:00", "2026-12-05T10:00:00+00:00"
  assert variant("fused", before) == variant("fused", None) == {None}  # fused was the default
  assert variant("fused", after) == {"attention=fused"}
  assert variant("auto", after) == variant("auto", before) == {None}
  assert variant("cudnn", before) == {"attention=cudnn"}


def test_sparse_steps_kept_factored_and_instantiated_clip_the_same_sum():
  """`--sparse`: the DP step's clipped sum under a row mask, kept factored or instantiated, is
  the same (up to the ghost bounds' factors) and zero on the masked rows; its rows carry the
  variant."""
  import jax
  import numpy as np
  from benchmarks import harness
  from dpjax import parallel
  mesh = parallel.make_mesh(1, 1)
  sums = {}
  for sparse in ("rows", "instantiated"):
    steps = harness.Steps("cnn_tanh", mesh, 8, 2, "float32", method="ghost", sparse=sparse)
    steps.dp(*steps.state)
    sums[sparse] = jax.tree_util.tree_map(lambda x: np.asarray(x).sum(0), steps.spent.grad_sum)
  mask = jax.tree_util.tree_map(np.asarray, steps.element_mask)
  assert 0 < np.mean(np.concatenate([m.ravel() for m in jax.tree_util.tree_leaves(mask)])) < 1
  for a, b, m in zip(*(jax.tree_util.tree_leaves(t) for t in (sums["rows"], sums["instantiated"],
                                                             mask))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    assert np.all(a[m == 0] == 0)
  raw = dict(model="wrn_16_4", dtype="float32", device="cpu", batch=8, microbatch=8,
             microbatches=1, per_example="ghost", clip="flat", non_dp_examples_per_s=2.0,
             dp_examples_per_s=1.0, dp_over_non_dp=0.5, sparse="rows")
  rows = throughput.to_rows(raw, run=0, sources=("a#/0", "a#/1"), command="c", commit=None,
                            date="2026-12-05T10:00:00+00:00")
  assert {r["variant"] for r in rows} == {"sparse=rows"}


def test_table_json_rows_follow_the_schema_and_every_archived_file_is_accounted_for():
  rows = convert_results.read_table()
  assert {r["source"].split("/")[0] for r in rows} <= {"archive", "runs"}
  archived = {p.name for p in (convert_results.RESULTS / "archive").glob("*.json")}
  converted = {name for name, _, _ in convert_results.ARCHIVE}
  assert not converted & set(convert_results.DIAGNOSTIC)
  assert archived == converted | set(convert_results.DIAGNOSTIC)
  assert {schema.source_file(r).split("/")[1] for r in rows
          if r["source"].startswith("archive/")} == converted


def test_table_json_and_csv_are_what_the_archive_and_runs_give():
  """The committed table.json and table.csv are the converter's output (run it twice: the same
  text), so `python -m benchmarks.convert_results` was run after the last change."""
  first, second = (dict(convert_results.files(convert_results.build_table())) for _ in range(2))
  assert first == second
  for name, text in first.items():
    assert (convert_results.RESULTS / name).read_text() == text, (
        f"{name} is stale: run python -m benchmarks.convert_results")


def _numbers(tree) -> set:
  if isinstance(tree, dict):
    return set().union(*map(_numbers, tree.values())) if tree else set()
  if isinstance(tree, list):
    return set().union(*map(_numbers, tree)) if tree else set()
  return {tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else set()


def test_table_archived_rows_hold_only_values_of_their_source_file():
  """Every rate, compile time and peak (as MiB) of a converted row is a number of the file it
  names; a commit is in that file's text or quoted from the archived README."""
  cache = {}
  for row in convert_results.read_table():
    file = schema.source_file(row)
    if not file.startswith("archive/"):
      continue
    if file not in cache:
      text = (convert_results.RESULTS / file).read_text()
      cache[file] = (_numbers(json.loads(text)), text)
    numbers, text = cache[file]
    values = [row["examples_per_s"], row["compile_s"]] + (
        [] if row["peak_memory_bytes"] is None else [row["peak_memory_bytes"] / 2**20])
    assert all(v is None or v in numbers for v in values), (row["source"], values)
    assert row["commit"] is None or row["commit"] in text or (
        convert_results.README_COMMITS[file.split("/")[1]][0] == row["commit"])


def test_readme_table_is_the_generated_one():
  readme = (convert_results.RESULTS / "README.md").read_text()
  table = report_table.markdown(convert_results.read_table())
  assert report_table.replace_table(readme, table) == readme, (
      "the README's table is stale: run python -m benchmarks.report_table")
  assert readme.index(report_table.BEGIN) < readme.index("## ")  # the table comes first


def test_timing_times_windows_after_a_first_call_and_warmup():
  from benchmarks import timing
  calls, waits = [], []
  first, per_step = timing.time_calls(lambda: calls.append(1) or len(calls), waits.append,
                                      windows=3, steps=4, warmup=2)
  assert len(calls) == 1 + 2 + 3 * 4
  assert waits == [1, 3, 7, 11, 15]  # the first call, the warm-up, then each window's last
  assert first >= 0 and per_step >= 0
  with pytest.raises(ValueError, match="windows >= 1"):
    timing.time_calls(lambda: None, lambda out: None, windows=0, steps=1)


def _peer_raw(mode: str, batch: int, dp_rate: float, benchmark_method: str | None = None):
  """A peer subprocess's raw measurement (`benchmarks.peers.search`); non-DP rate 2 × batch."""
  raw = dict(model="vit_test", dtype="bfloat16", batch=batch, microbatch=batch, microbatches=1,
             method=None if mode == "nonprivate" else (benchmark_method or mode), clip="flat",
             device="cpu", details=dict(framework="peer 1.0"),
             non_dp_examples_per_s=2.0 * batch, non_dp_step_ms=1.0, non_dp_compile_s=0.5,
             non_dp_peak_memory_bytes=2**20)
  if mode != "nonprivate":
    raw.update(dp_examples_per_s=dp_rate, dp_step_ms=2.0, dp_compile_s=1.0,
               dp_peak_memory_bytes=2**21)
  return raw


def test_peer_batch_search_stops_at_out_of_memory_and_marks_the_fastest_batch(tmp_path,
                                                                               monkeypatch):
  """Each mode's batches run in increasing order until one runs out of memory (the larger ones
  are listed as skipped, not run); the plain row of each search is its fastest batch (by the DP
  rate, or the non-DP rate for runs of the non-private step alone)."""
  import argparse

  from benchmarks import rows
  from benchmarks.peers import search
  calls = []

  def measured(flags):
    config = dict(flag[2:].split("=", 1) for flag in flags)
    mode, batch = config["mode"], int(config["batch"])
    calls.append((mode, batch))
    if batch == 256:
      return dict(mode=mode, batch=batch, failed="torch.OutOfMemoryError: CUDA out of memory.")
    return _peer_raw(mode, batch, {32: 100.0, 64: 150.0, 128: 120.0}[batch])

  monkeypatch.setattr(rows, "run_row", _fake_run_row(measured))
  out = tmp_path / "peer.json"
  found, failed = search.run_search(
      "benchmarks.peers.opacus_vit", "peers.opacus_vit",
      search.configurations(["ghost", "nonprivate"], search.parse_batches("512,32,256,64,128")),
      lambda config: [f"--mode={config['mode']}", f"--batch={config['batch']}"],
      argparse.Namespace(out=str(out), commit="abc1234"))
  assert calls == [(mode, b) for mode in ("ghost", "nonprivate") for b in (32, 64, 128, 256)]
  assert [(f["mode"], f["batch"], f["failed"].split(":")[0]) for f in failed] == [
      ("ghost", 256, "torch.OutOfMemoryError"), ("ghost", 512, "skipped"),
      ("nonprivate", 256, "torch.OutOfMemoryError"), ("nonprivate", 512, "skipped")]
  written = json.loads(out.read_text())
  assert written["format"] == schema.FORMAT and written["rows"] == found
  table = schema.validate_table(found)
  assert [(r["mode"], r["method"], r["batch"], r["variant"]) for r in table
          if r["variant"] is None or "(batch 64" not in r["variant"]] == [
      ("nondp", None, 64, None), ("dp", "ghost", 64, None),
      ("nondp", None, 32, search.NOT_FASTEST.format(best=128)),
      ("nondp", None, 64, search.NOT_FASTEST.format(best=128)), ("nondp", None, 128, None)]
  assert all(r["commit"] == "abc1234" and r["benchmark"] == "peers.opacus_vit" for r in table)
  assert "**Peer: Opacus's DP step on timm's ViT" in report_table.markdown(table)
  assert "| 1 | vit_test | ghost | flat | bfloat16 | 64 × 1 | cpu | 150 | 128 |" in (
      report_table.markdown(table))
  assert search.is_out_of_memory("XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while")
  with pytest.raises(ValueError, match="positive"):
    search.parse_batches("0,8")


def test_peer_table_sets_dpjax_beside_its_peers_and_states_the_ratios():
  from benchmarks.peers import search, table
  peers = [search.to_rows(_peer_raw(mode, 16, rate, method), benchmark=benchmark, run=0,
                          sources=(f"{name}.json#/rows/0", f"{name}.json#/rows/1"), command="c",
                          commit=None, date=None)
           for name, benchmark, mode, rate, method in (
               ("o", "peers.opacus_vit", "ghost", 20.0, None),
               ("j", "peers.jax_privacy_vit", "dp", 40.0, "vmap"))]
  rows = _pair(0, dp_rate=60.0) + peers[0] + peers[1]  # dpjax: DP 60, non-DP 100 ex/s
  text = table.markdown(rows)
  assert "| dpjax | vit_test | ghost | float32 | 8 × 2 | cpu | 60.0 | 100.0 | 0.600 | 1 | — |" in text
  assert "| Opacus / timm | vit_test | ghost | bfloat16 | 16 × 1 | cpu | 20.0 | 32.0 | 0.625 |" in text
  assert "| jax_privacy / plain JAX | vit_test | vmap |" in text
  assert [line.split(";")[0] for line in table.comparisons(rows)] == [
      "- vit_test: dpjax DP ÷ Opacus's best DP = 60.0 / 20.0 = 3.00× (target ≥ 3×)",
      "- vit_test: dpjax DP ÷ jax_privacy clipped_grad DP = 60.0 / 40.0 = 1.50× (target ≥ 1.5×)",
      "- vit_test: dpjax non-private ÷ timm non-private = 100.0 / 32.0 = 3.12×"]


def test_scaling_trainer_times_the_training_loop_on_a_layouts_devices(tmp_path, dataset_cache):
  """One layout in its subprocess, on 2 of the virtual devices: the trainer on (fake) cifar10_jpeg
  through the pipeline, its non-DP and DP rows with the Poisson batches' realised examples."""
  from tests.experiment_configs_test import _fake_cifar10_jpeg
  out = tmp_path / "st.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS")  # the layout's process gets its own device count
  done = subprocess.run([sys.executable, "-m", "benchmarks.scaling_trainer", "--platform=cpu",
                         "--model=vit_test", "--microbatch=2", "--microbatches=2", "--warmup=1",
                         "--window=1", "--windows=2", "--workers=0", "--layouts=2x1",
                         f"--data_dir={_fake_cifar10_jpeg(tmp_path)}", f"--out={out}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  nondp, dp = schema.validate_table(json.loads(out.read_text())["rows"])
  assert (dp["benchmark"], dp["mesh"], dp["method"], dp["variant"]) == (
      "scaling_trainer", "2x1", "ghost", None)
  assert (dp["microbatch"], dp["microbatches"], nondp["batch"]) == (4, 2, 4)
  assert dp["details"]["devices"] == 2 and dp["details"]["timed_steps"] == 2
  assert dp["details"]["efficiency"] is None  # no 1x1 layout in the call
  # a Poisson batch of expected size 8 in microbatches of 4: some rows are padding
  assert 0 < dp["details"]["examples_per_step"] and 0 <= dp["details"]["padding"] < 1
  assert nondp["details"]["examples_per_step"] == 4 and nondp["details"]["padding"] == 0


def test_scaling_trainer_efficiency_is_against_the_calls_one_device_layout(tmp_path,
                                                                            monkeypatch):
  """Layouts parsed (one process per device with --processes), each measured by a stand-in;
  efficiency = examples/s ÷ (devices × 1x1's); a layout of processes is run through
  launch/multiprocess.py and its rows carry the variant."""
  from benchmarks import scaling_trainer as st
  assert st.parse_layout("2x4") == st.Layout(2, 4, 1)
  assert st.parse_layout("8x1", processes=8) == st.Layout(8, 1, 8)
  assert st.parse_layout("4x1", processes=8) == st.Layout(4, 1, 1)
  with pytest.raises(SystemExit, match="processes must divide"):
    st.parse_layout("2x1/3")
  command, _ = st.layout_command(st.Layout(4, 1, 2), ["--model=vit_test"], "cpu")
  assert command[1].endswith("launch/multiprocess.py") and "--devices_per_process=2" in command
  assert command[command.index("--") + 1:][-3:] == ["--one", "4x1/2", "--model=vit_test"]
  _, env = st.layout_command(st.Layout(4, 1), [], "cpu")
  assert "--xla_force_host_platform_device_count=4" in env["XLA_FLAGS"]
  _, env = st.layout_command(st.Layout(4, 1), [], "gpu")
  assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"

  def measured(layout, flags, platform):
    rate = {1: 100.0, 2: 180.0, 4: 380.0}[layout.devices]
    return dict(model="vit_test", data=layout.data, fsdp=layout.fsdp, devices=layout.devices,
                processes=layout.processes, dtype="bfloat16", method="ghost", per_device=2,
                microbatches=2, expected_batch=4 * layout.devices, device="cpu", jax="0",
                platform="cpu", dp_microbatch=2 * layout.devices,
                non_dp_microbatch=2 * layout.devices,
                **{f"{m}_{k}": v for m, scale in (("dp", 1.0), ("non_dp", 2.0)) for k, v in dict(
                    examples_per_s=scale * rate, spread=[rate, rate], step_ms=1.0, padding=0.1,
                    peak_memory_bytes=2**20, overall_examples_per_s=rate, examples_per_step=4.0,
                    build_s=1.0, warmup_s=1.0, timed_steps=4).items()})
  monkeypatch.setattr(st, "measure_layout", measured)
  monkeypatch.delenv("XLA_FLAGS")  # else the rows' variant names the tests' device count
  out = tmp_path / "s.json"
  monkeypatch.setattr(sys, "argv", ["scaling_trainer", "--layouts=1x1,2x1,4x1",
                                    "--processes=4", "--commit=abc1234", f"--out={out}"])
  st.main()
  rows = schema.validate_table(json.loads(out.read_text())["rows"])
  dp = [r for r in rows if r["mode"] == "dp"]
  assert [r["details"]["efficiency"] for r in dp] == [1.0, 0.9, 0.95]
  assert [r["variant"] for r in dp] == [None, None, "4 processes"]


def test_host_loop_times_the_dp_and_the_non_private_loop(tmp_path, monkeypatch, capsys,
                                                         dataset_cache):
  """Both loops, short and long runs, the rate from their difference, a profile on request."""
  from benchmarks import host_loop
  from tests.conftest import require_data
  require_data()
  out = tmp_path / "h.json"
  monkeypatch.setattr(sys, "argv", ["host_loop", "--batch=16", "--short=2", "--long=6",
                                    "--profile=5", f"--out={out}"])
  host_loop.main()
  rows = json.loads(out.read_text())["rows"]
  assert [r["loop"] for r in rows] == ["dp", "nondp"]
  for r in rows:
    seconds = {int(k): v for k, v in r["train_seconds"].items()}
    assert r["steps_per_s"] == pytest.approx(4 / (seconds[6] - seconds[2]))
  printed = capsys.readouterr().out
  assert "dp: " in printed and "ms per step" in printed and "tottime" in printed
  config = host_loop.config_for("dp", 10, 16)
  assert (config.data.public_fraction, config.mixing.alpha) == (0.0, 0.0)
  assert host_loop.config_for("nondp", 10, 16).mixing.alpha == 1.0
