"""One process of a multi-process training run, for tests/multihost_test.py.

python -m tests.multihost_worker WORKDIR OVERRIDES_JSON [PROCESS_1_OVERRIDES_JSON]
Runs `e2e_test.small_config(**overrides)` (process 1 also applies the second overrides, to test
that processes disagreeing on the config are refused). jax.distributed is started from the
DPJAX_* environment that launch/multiprocess.py sets.
"""

import json
import os
import sys

from dpjax import parallel
from dpjax.train import loop
from tests.e2e_test import small_config


def main(workdir: str, overrides: str, process_1_overrides: str = "{}") -> None:
  parallel.initialize_distributed()
  blocks = json.loads(overrides)
  if os.environ.get("DPJAX_PROCESS_ID") == "1":
    for block, values in json.loads(process_1_overrides).items():
      blocks.setdefault(block, {}).update(values)
  loop.train_and_evaluate(small_config(**blocks), workdir, show_progress=False)


if __name__ == "__main__":
  main(*sys.argv[1:])
