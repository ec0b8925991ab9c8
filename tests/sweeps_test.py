"""Tests of dpjax.sweeps on fake workdirs, and launch/sweep.py end to end on a tiny real sweep."""

import csv
import json
import os
import shlex
import pathlib
import subprocess
import sys
import time

import pytest

from dpjax import sweeps
from tests.conftest import require_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_expand_is_the_product_in_order_with_distinct_safe_names():
  variants = sweeps.expand(["mixing.switch_step=0,100,200", "dp.target_epsilon=1,3"])
  assert len(variants) == 6
  assert variants[0] == {"mixing.switch_step": "0", "dp.target_epsilon": "1"}
  assert variants[-1] == {"mixing.switch_step": "200", "dp.target_epsilon": "3"}
  names = [sweeps.variant_name(v) for v in variants]
  assert names[3] == "switch_step=100,target_epsilon=3"
  assert len(set(names)) == 6
  assert sweeps.expand([]) == [{}] and sweeps.variant_name({}) == "base"


def test_variant_names_keep_full_keys_when_short_ones_clash_and_are_filesystem_safe():
  assert sweeps.variant_name({"a.lr": "1", "b.lr": "2"}) == "a.lr=1,b.lr=2"
  assert sweeps.variant_name({"data.name": "../x y"}) == "name=.._x_y"


@pytest.mark.parametrize("spec", ["mixing.switch_step", "=1,2", "a="])
def test_expand_refuses_malformed_axes(spec):
  with pytest.raises(ValueError, match="KEY=V1,V2"):
    sweeps.expand([spec])


def test_expand_refuses_a_repeated_key():
  with pytest.raises(ValueError, match="each KEY once"):
    sweeps.expand(["a=1", "a=2"])


def test_commands_give_each_variant_its_workdir_and_overrides():
  variants = sweeps.expand(["mixing.switch_step=0,100"])
  cmds = sweeps.commands("experiments/continual.py:dp", "sw", variants,
                         ["--config.schedule.total_steps=6", "--progress=false"])
  assert cmds[1] == ["python", "-m", "dpjax.main", "--config=experiments/continual.py:dp",
                     "--workdir=sw/switch_step=100", "--config.mixing.switch_step=100",
                     "--config.schedule.total_steps=6", "--progress=false"]


def test_set_values_name_each_variants_swept_values():
  """{seed} in a --set value: each seed's fine-tuning starts from the same seed's pre-training."""
  variants = sweeps.expand(["seed=0,1", "dp.target_epsilon=3"])
  cmds = sweeps.commands("e.py:sparta", "sw", variants,
                         ["--config.finetune.init_from=pre/seed={seed},eps={dp.target_epsilon}",
                          "--config.x={target_epsilon}", "--progress=false"])
  assert [c[-3:] for c in cmds] == [
      ["--config.finetune.init_from=pre/seed=0,eps=3", "--config.x=3", "--progress=false"],
      ["--config.finetune.init_from=pre/seed=1,eps=3", "--config.x=3", "--progress=false"]]
  with pytest.raises(ValueError, match=r"\{lr\}, which is not one swept key"):
    sweeps.commands("e.py", "sw", variants, ["--config.a={lr}"])
  clash = sweeps.expand(["a.lr=1", "b.lr=2"])
  with pytest.raises(ValueError, match="in full where two keys end the same"):
    sweeps.commands("e.py", "sw", clash, ["--config.a={lr}"])
  assert sweeps.commands("e.py", "sw", clash, ["--config.c={b.lr}"])[0][-1] == "--config.c=2"


def test_commands_refuse_variants_that_would_share_a_folder():
  with pytest.raises(ValueError, match="share a folder"):
    sweeps.commands("c.py", "sw", [{"data.name": "a/b"}, {"data.name": "a b"}])


def _script(tmp_path, code, workdir):
  """A command for run_local: `python -c CODE --workdir=...` (run_local swaps in sys.executable)."""
  return ["python", "-c", code, f"--workdir={tmp_path / workdir}"]


def test_run_local_skips_finished_variants_and_names_the_one_that_fails(tmp_path):
  (tmp_path / "done").mkdir()
  (tmp_path / "done" / "results.json").write_text("{}")
  touch = "import sys, pathlib; pathlib.Path(sys.argv[1].split('=', 1)[1], 'ran').touch()"
  (tmp_path / "todo").mkdir()
  cmds = [_script(tmp_path, "raise SystemExit(1)", "done"), _script(tmp_path, touch, "todo"),
          _script(tmp_path, "raise SystemExit('boom')", "bad=1"),
          _script(tmp_path, touch, "never")]
  with pytest.raises(sweeps.SweepError, match=r"(?s)Variant bad=1 failed with exit code 1.*boom"):
    sweeps.run_local(cmds, capture=True)
  assert (tmp_path / "todo" / "ran").exists()
  assert not (tmp_path / "never").exists()


def test_run_local_in_parallel_runs_them_together_with_a_share_of_the_gpu_and_a_log_each(
    tmp_path, monkeypatch):
  """Each script waits for the other to have started (so one at a time would fail), writes the
  memory share it was given, and prints a line that must land in its own log."""
  meet = ("import os, sys, time, pathlib; me = sys.argv[1].split('=', 1)[1]; "
          "pathlib.Path(me).mkdir(); pathlib.Path(me, 'share').write_text("
          "os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']); other = me[:-1] + {'a': 'b', 'b': 'a'}"
          "[me[-1]]; t = time.time()\n"
          "while not os.path.exists(other):\n  time.sleep(0.05)\n"
          "  if time.time() - t > 20: raise SystemExit('alone')\n"
          "print('hello from', me)")
  cmds = [_script(tmp_path, meet, "a"), _script(tmp_path, meet, "b")]
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  sweeps.run_local(cmds, parallel=2)
  assert (tmp_path / "a" / "share").read_text() == "0.450"
  assert "hello from" in (tmp_path / "b.log").read_text()
  failing = [_script(tmp_path, "raise SystemExit('boom')", "c"),
             _script(tmp_path, "import time; time.sleep(0.5)", "d")]
  with pytest.raises(sweeps.SweepError, match=r"(?s)Variant c failed.*boom"):
    sweeps.run_local(failing, parallel=2)
  with pytest.raises(ValueError, match="parallel"):
    sweeps.run_local(cmds, parallel=0)


def test_run_local_in_parallel_starts_the_next_run_when_any_ends(tmp_path):
  """a waits for c to start; b ends at once: c must take b's slot while a still runs."""
  wait_for_c = ("import os, sys, time; t = time.time()\n"
                f"while not os.path.exists({str(tmp_path / 'c')!r}):\n  time.sleep(0.05)\n"
                "  if time.time() - t > 20: raise SystemExit('c never started')")
  make_c = "import sys, pathlib; pathlib.Path(sys.argv[1].split('=', 1)[1]).mkdir()"
  sweeps.run_local([_script(tmp_path, wait_for_c, "a"), _script(tmp_path, "pass", "b"),
                    _script(tmp_path, make_c, "c")], parallel=2)
  assert (tmp_path / "c").is_dir()


def test_run_local_starts_no_run_past_start_before_and_lets_started_ones_finish(tmp_path):
  """a is started before the deadline and runs past it (it must finish); b and c would start
  after a's slot frees, past the deadline: they are not started and named."""
  slow = ("import sys, time, pathlib; time.sleep(1.0); "
          "pathlib.Path(sys.argv[1].split('=', 1)[1]).mkdir()")
  make = "import sys, pathlib; pathlib.Path(sys.argv[1].split('=', 1)[1]).mkdir()"
  cmds = [_script(tmp_path, slow, "a"), _script(tmp_path, make, "b"),
          _script(tmp_path, make, "c")]
  not_started = sweeps.run_local(cmds, start_before=time.time() + 0.5)
  assert (tmp_path / "a").is_dir()
  assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
  assert not_started == ["b", "c"]
  assert sweeps.run_local(cmds[1:], start_before=time.time() + 60) == []
  assert (tmp_path / "b").is_dir() and (tmp_path / "c").is_dir()


def test_commands_of_several_configs_are_named_after_their_args():
  cmds = sweeps.commands("e.py:public_only,B", "sw", sweeps.expand(["seed=0,1"]), (),
                         prefix="public_only,B")
  assert [c[4] for c in cmds] == ["--workdir=sw/public_only,B,seed=0",
                                  "--workdir=sw/public_only,B,seed=1"]
  assert sweeps.commands("e.py:x", "sw", [{}], (), prefix="x")[0][4] == "--workdir=sw/x"


def _fake_run(workdir, overrides, accuracy, curvature=()):
  """A finished variant: variant.json, results.json and metrics.jsonl with curvature records."""
  os.makedirs(workdir)
  with open(workdir / "variant.json", "w") as f:
    json.dump(dict(config="c.py", overrides=overrides), f)
  with open(workdir / "results.json", "w") as f:
    json.dump(dict(test_accuracy=accuracy, test_loss=0.5, steps=10, stopped="completed",
                   train_seconds=1.0, privacy=dict(
                       epsilon=3.0, delta=1e-5, accountant="rdp", private_steps=5,
                       public_steps=5, noise_multiplier=1.1, non_private=False,
                       epsilon_by_accountant=dict(pld=2.5, rdp=3.0))), f)
  with open(workdir / "metrics.jsonl", "w") as f:
    f.write(json.dumps(dict(step=10, kind="eval", test_accuracy=accuracy)) + "\n")
    for step, trace in curvature:
      f.write(json.dumps(dict(step=step, kind="curvature", trace_h=trace, alpha_star=-trace,
                              note="text", decelerator="nan")) + "\n")


@pytest.fixture
def sweep_dir(tmp_path):
  for step in (0, 100, 20):
    for eps in (1, 3):
      overrides = {"mixing.switch_step": str(step), "dp.target_epsilon": str(eps)}
      curvature = [(s, 1.0 + s + eps) for s in (2, 4, 6)] if step else ()
      accuracy = 0.5 + step / 1000 + eps / 100
      _fake_run(tmp_path / sweeps.variant_name(overrides), overrides, accuracy, curvature)
  (tmp_path / "unfinished").mkdir()
  return tmp_path


def test_collect_reads_every_finished_variant_with_its_swept_values(sweep_dir):
  rows = sweeps.collect(str(sweep_dir))
  assert [r["variant"] for r in rows][:4] == [
      "switch_step=0,target_epsilon=1", "switch_step=0,target_epsilon=3",
      "switch_step=20,target_epsilon=1", "switch_step=20,target_epsilon=3"]
  row = rows[3]
  assert row["mixing.switch_step"] == 20 and row["dp.target_epsilon"] == 3
  assert row["test_accuracy"] == pytest.approx(0.55)
  assert row["privacy.epsilon_by_accountant.pld"] == 2.5
  assert row["workdir"] == str(sweep_dir / row["variant"])


def test_write_csv_has_one_row_per_variant_and_every_column(sweep_dir, tmp_path):
  rows = sweeps.collect(str(sweep_dir))
  rows[0]["extra"] = "only here"
  sweeps.write_csv(rows, tmp_path / "results.csv")
  with open(tmp_path / "results.csv") as f:
    read = list(csv.DictReader(f))
  assert len(read) == 6
  assert read[2]["mixing.switch_step"] == "20" and read[2]["privacy.epsilon"] == "3.0"
  assert read[0]["extra"] == "only here" and read[1]["extra"] == ""


def _is_png(path):
  data = pathlib.Path(path).read_bytes()
  return len(data) > 1000 and data.startswith(PNG)


def test_plot_accuracy_writes_a_png(sweep_dir, tmp_path):
  rows = sweeps.collect(str(sweep_dir))
  sweeps.plot_accuracy(rows, "mixing.switch_step", "dp.target_epsilon", tmp_path / "a.png",
                       dict(private_only=0.7, non_dp=0.9))
  sweeps.plot_accuracy(rows, "dp.target_epsilon", None, tmp_path / "b.png")
  assert _is_png(tmp_path / "a.png") and _is_png(tmp_path / "b.png")
  with pytest.raises(ValueError, match="No finished variant has 'seed'"):
    sweeps.plot_accuracy(rows, "seed", None, tmp_path / "c.png")


def test_plot_curves_writes_a_png_of_the_curvature_records(sweep_dir, tmp_path):
  assert sweeps.plot_curves(str(sweep_dir), None, tmp_path / "all.png")
  assert sweeps.plot_curves(sweeps.collect(str(sweep_dir)), ["trace_h"], tmp_path / "one.png")
  assert _is_png(tmp_path / "all.png") and _is_png(tmp_path / "one.png")


def test_plot_curves_writes_nothing_without_curvature_records(tmp_path):
  _fake_run(tmp_path / "sweep" / "a=1", {"a": "1"}, 0.5)
  assert not sweeps.plot_curves(str(tmp_path / "sweep"), None, tmp_path / "c.png")
  assert not sweeps.plot_curves(str(tmp_path / "sweep"), ["trace_h"], tmp_path / "c.png")
  assert not (tmp_path / "c.png").exists()


def test_launcher_names_folders_after_the_config_and_fills_set_values(tmp_path):
  """--config_in_name: one --config's folders are named as in a sweep of several, so a later
  call with more configs skips them; {seed} in --set is each variant's seed."""
  launch = lambda *configs: subprocess.run(
      [sys.executable, "launch/sweep.py", *[f"--config=experiments/finetune_cifar.py:{c}"
                                            for c in configs],
       f"--workdir={tmp_path}", "--sweep=seed=0,1", "--set=finetune.init_from=pre/seed={seed}",
       "--config_in_name", "--print_commands"],
      cwd=ROOT, capture_output=True, text=True, check=True,
      env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout.splitlines()
  one, two = launch("head"), launch("head", "bias")
  assert one == two[:2]
  assert [shlex.split(c)[4:] for c in one] == [
      [f"--workdir={tmp_path}/head,seed={s}", f"--config.seed={s}",
       f"--config.finetune.init_from=pre/seed={s}", "--progress=false"] for s in (0, 1)]


def test_launcher_runs_a_tiny_sweep_end_to_end(tmp_path, dataset_cache):
  """Two 6-step variants of the main job (about 45 s on 2 CPU cores, 25 s with warm caches)."""
  require_data()
  tiny = ["schedule.total_steps=6", "dp.expected_batch_size=64", "perf.microbatch_size=64",
          "dp.accountant=rdp", "eval.every_steps=1000", "schedule.public_batch_size=64",
          "mesh.data=1"]  # one of the 8 virtual devices: sharded runs have their own tests
  workdir = tmp_path / "sweep"
  proc = subprocess.run(
      [sys.executable, "launch/sweep.py", "--config=experiments/continual.py:dp",
       f"--workdir={workdir}", "--sweep=mixing.switch_step=2,4", "--capture",
       *[f"--set={s}" for s in tiny]],
      cwd=ROOT, capture_output=True, text=True,  # this checkout's dpjax, not an installed one
      env=dict(os.environ, DPJAX_CACHE_DIR=str(dataset_cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["mixing.switch_step"], r["steps"], r["privacy.public_steps"]) for r in rows] == [
      ("2", "6", "2"), ("4", "6", "4")]
  assert _is_png(workdir / "accuracy.png")
  assert f"{workdir}/results.csv" in proc.stdout and "| switch_step=4 |" in proc.stdout
