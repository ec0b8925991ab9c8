"""Test setup: 8 virtual CPU devices (set before jax is imported) and the data directory."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests build the same jitted functions many times over (one trainer per test): a persistent
# compilation cache turns every compile after the first into a load.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "dpjax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

_DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
if "DPJAX_DATA_DIR" not in os.environ and _DEFAULT_DATA.is_dir():
  os.environ["DPJAX_DATA_DIR"] = str(_DEFAULT_DATA)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def dataset_cache(tmp_path_factory):
  """One TFDS cache per test worker, so the original files are converted once per session."""
  path = tmp_path_factory.mktemp("dpjax_cache")
  os.environ["DPJAX_CACHE_DIR"] = str(path)
  return path


def require_data():
  if not os.environ.get("DPJAX_DATA_DIR") or not os.path.isdir(os.environ["DPJAX_DATA_DIR"]):
    pytest.skip("DPJAX_DATA_DIR is not set to a folder holding MNIST / Fashion-MNIST.")
