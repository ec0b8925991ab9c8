"""Tests of dpjax.data.locations: where the original files are looked for."""

import pytest

from dpjax.data import locations
from dpjax.data import specs


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
  monkeypatch.delenv(locations.DATA_DIR_ENV, raising=False)


def _place_files(folder, name):
  """Creates empty stand-ins for all of `name`'s files (only their presence is looked at)."""
  folder.mkdir(parents=True, exist_ok=True)
  for f in specs.get_spec(name).all_files:
    (folder / f).touch()
  return folder


@pytest.mark.parametrize("name, subfolder", [
    ("mnist", "mnist"), ("fashion_mnist", "fashion-mnist"), ("cifar10", "cifar-10-batches-py")])
def test_subfolder_layout(tmp_path, name, subfolder):
  want = _place_files(tmp_path / subfolder, name)
  assert locations.resolve_data_dir(name, tmp_path) == want


def test_flat_layout(tmp_path):
  _place_files(tmp_path, "mnist")
  assert locations.resolve_data_dir("mnist", tmp_path) == tmp_path


def test_cifar_tarball(tmp_path):
  (tmp_path / specs.CIFAR10_TARBALL).touch()
  assert locations.resolve_data_dir("cifar10", tmp_path) == tmp_path / specs.CIFAR10_TARBALL


def test_env_is_used_without_configured_dir(tmp_path, monkeypatch):
  want = _place_files(tmp_path / "mnist", "mnist")
  monkeypatch.setenv(locations.DATA_DIR_ENV, str(tmp_path))
  assert locations.resolve_data_dir("mnist") == want


def test_configured_dir_wins_over_env_and_is_the_only_place(tmp_path, monkeypatch):
  _place_files(tmp_path / "env" / "mnist", "mnist")
  monkeypatch.setenv(locations.DATA_DIR_ENV, str(tmp_path / "env"))
  want = _place_files(tmp_path / "configured", "mnist")
  assert locations.resolve_data_dir("mnist", tmp_path / "configured") == want
  with pytest.raises(locations.DataNotFoundError):
    locations.resolve_data_dir("mnist", tmp_path / "elsewhere")


def test_incomplete_folder_is_not_accepted(tmp_path):
  _place_files(tmp_path / "mnist", "mnist")
  (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(locations.DataNotFoundError):
    locations.resolve_data_dir("mnist", tmp_path)


def test_missing_dir_message_says_what_where_and_how(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(locations.DataNotFoundError) as error:
    locations.resolve_data_dir("fashion_mnist", missing)
  message = str(error.value)
  assert "Fashion-MNIST files not found" in message
  assert str(missing / "fashion-mnist") in message and str(missing) in message
  assert "train-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
  assert "--config.data.dir" in message and locations.DATA_DIR_ENV in message
  assert "apt-get install dataset-fashion-mnist" in message


def test_nothing_configured_message():
  with pytest.raises(locations.DataNotFoundError, match=f"{locations.DATA_DIR_ENV} is unset"):
    locations.resolve_data_dir("mnist")


def test_unknown_dataset_lists_known_ones():
  with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10"):
    locations.resolve_data_dir("imagenet")
