"""Runs one command as N processes of a jax.distributed job on this machine.

Usage (two CPU processes with two devices each, gloo collectives):
  python launch/multiprocess.py --num_processes=2 --devices_per_process=2 -- \\
      python -m dpjax.main --config=experiments/continual.py:dp --workdir=/tmp/fmnist_2proc

Every process gets DPJAX_COORDINATOR_ADDRESS (localhost and a free port), DPJAX_NUM_PROCESSES and
DPJAX_PROCESS_ID, which `dpjax.parallel.initialize_distributed` (called by dpjax.main) reads. With
--platform=cpu (the default) each process also gets JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=D, and uses gloo for collectives. With
--platform=gpu process i sees GPUs [i·D, (i+1)·D) through CUDA_VISIBLE_DEVICES.

Output lines are prefixed with "[i] ". If one process fails the others are stopped, and the exit
status is the first non-zero one.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                platform: str) -> dict[str, str]:
  env = dict(os.environ, DPJAX_COORDINATOR_ADDRESS=f"localhost:{port}",
             DPJAX_NUM_PROCESSES=str(num_processes), DPJAX_PROCESS_ID=str(process_id))
  if platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [
        f"--xla_force_host_platform_device_count={devices_per_process}"])
  else:
    first = process_id * devices_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + d) for d in range(devices_per_process))
  return env


def _relay(stream, prefix: str) -> None:
  for line in iter(stream.readline, ""):
    sys.stdout.write(prefix + line)
    sys.stdout.flush()


def run(command: list[str], num_processes: int, devices_per_process: int = 1,
        platform: str = "cpu") -> int:
  """Runs `command` as `num_processes` processes; returns the first non-zero exit status or 0."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError("--num_processes and --devices_per_process must be >= 1.")
  port = free_port()
  procs, relays = [], []
  for i in range(num_processes):
    p = subprocess.Popen(command, env=process_env(i, num_processes, port, devices_per_process,
                                                  platform),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t = threading.Thread(target=_relay, args=(p.stdout, f"[{i}] "), daemon=True)
    t.start()
    procs.append(p)
    relays.append(t)
  status = 0
  remaining = list(procs)
  while remaining:
    for p in list(remaining):
      try:
        code = p.wait(timeout=0.5)
      except subprocess.TimeoutExpired:
        continue
      remaining.remove(p)
      if code and not status:
        status = code
        for other in remaining:  # one failed: the job cannot finish, stop the rest
          other.terminate()
  for t in relays:
    t.join(timeout=5)
  return status


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--platform", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="the command every process runs, after --")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --, e.g. -- python -m dpjax.main --config=...")
  sys.exit(run(command, args.num_processes, args.devices_per_process, args.platform))


if __name__ == "__main__":
  main()
