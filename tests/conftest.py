"""Test setup: 8 virtual CPU devices (set before jax is imported) and the data directory."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
if "DPJAX_DATA_DIR" not in os.environ and _DEFAULT_DATA.is_dir():
  os.environ["DPJAX_DATA_DIR"] = str(_DEFAULT_DATA)
