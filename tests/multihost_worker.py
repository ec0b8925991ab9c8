"""One process of a multi-process training run, for tests/multihost_test.py.

python -m tests.multihost_worker WORKDIR OVERRIDES_JSON [PROCESS_1_OVERRIDES_JSON]
Runs `e2e_test.small_config(**overrides)` (process 1 also applies the second overrides, to test
that processes disagreeing on the config are refused). jax.distributed is started from the
DPJAX_* environment that launch/multiprocess.py sets.
"""

import hashlib
import json
import os
import sys

import jax

from dpjax import parallel
from dpjax.privacy import randomness
from dpjax.train import loop
from tests.e2e_test import small_config


def _record_secret_digest(workdir: str) -> None:
  """Writes a digest of the mechanism secret this process trains with (tests only: a real run
  writes nothing about it), so the test can check that every process has process 0's."""
  original = randomness.run_secret

  def run_secret(seed):
    secret = original(seed)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"secret_digest.{jax.process_index()}"), "w") as f:
      f.write(hashlib.sha256(secret.tobytes()).hexdigest())
    return secret

  randomness.run_secret = run_secret


def main(workdir: str, overrides: str, process_1_overrides: str = "{}") -> None:
  parallel.initialize_distributed()
  _record_secret_digest(workdir)
  blocks = json.loads(overrides)
  if os.environ.get("DPJAX_PROCESS_ID") == "1":
    for block, values in json.loads(process_1_overrides).items():
      blocks.setdefault(block, {}).update(values)
  loop.train_and_evaluate(small_config(**blocks), workdir, show_progress=False)


if __name__ == "__main__":
  main(*sys.argv[1:])
