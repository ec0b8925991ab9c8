"""Where a dataset's original files are found on this machine.

Search order: the configured folder if one is given (and nothing else), otherwise the folder in
$DPJAX_DATA_DIR, then the folder an OS package installs to (Debian's
/usr/share/datasets/fashion-mnist for Fashion-MNIST). Below each root both layouts work:
ROOT/<subfolder>/files (e.g. ROOT/mnist/, ROOT/cifar-10-batches-py/ or ROOT/cifar-10-python.tar.gz)
and ROOT/files. An image-folder dataset is an archive (`ARCHIVE_SUFFIXES`) or a folder holding
train/: ROOT/<subfolder> (cifar10_jpeg: ROOT/cifar10-jpeg/cifar10-jpeg.tar.gz, ...) or ROOT itself,
which for "image_folder" must be configured (data.dir): $DPJAX_DATA_DIR is not one image folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from dpjax.data import specs

DATA_DIR_ENV = "DPJAX_DATA_DIR"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


class DataNotFoundError(FileNotFoundError):
  """A dataset's files are in none of the places dpjax looks."""


def resolve_data_dir(name: str, configured_dir: str | os.PathLike | None = None) -> Path:
  """Returns the folder holding `name`'s original files (for CIFAR-10 possibly its tarball; for an
  image-folder dataset its archive or its folder).

  Args:
    name: a dataset in `specs.KNOWN_DATASETS`.
    configured_dir: the folder from the config (--config.data.dir); when given, only it is searched.

  Raises:
    DataNotFoundError: naming the files looked for, the places searched and how to get the files.
  """
  spec = specs.get_spec(name)
  if name == "image_folder" and not configured_dir:
    raise DataNotFoundError(f"data.name = 'image_folder' reads the folder or archive that "
                            f"data.dir names, and data.dir is empty. {spec.how_to_get}")
  roots = _roots(spec, configured_dir)
  candidates = [c for root in roots for c in _candidates(spec, root)]
  for candidate in candidates:
    if _is_complete(spec, candidate):
      return candidate
  raise DataNotFoundError(_not_found_message(spec, roots, candidates))


def _roots(spec: specs.DatasetSpec, configured_dir: str | os.PathLike | None) -> list[Path]:
  if configured_dir:
    return [Path(configured_dir).expanduser()]
  roots = [Path(os.environ[DATA_DIR_ENV]).expanduser()] if os.environ.get(DATA_DIR_ENV) else []
  return roots + ([Path(spec.system_dir)] if spec.system_dir else [])


def _candidates(spec: specs.DatasetSpec, root: Path) -> list[Path]:
  return [root / sub for sub in spec.subfolders] + [root]


def is_archive(path: Path) -> bool:
  """Whether `path`'s name ends in one of ARCHIVE_SUFFIXES (any case)."""
  return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_complete(spec: specs.DatasetSpec | specs.ImageFolderSpec, path: Path) -> bool:
  if isinstance(spec, specs.ImageFolderSpec):
    return path.is_file() and is_archive(path) or (path / "train").is_dir()
  if path.name.endswith(".tar.gz"):
    return path.is_file()
  return all((path / f).is_file() for f in spec.all_files)


def _not_found_message(spec: specs.DatasetSpec | specs.ImageFolderSpec, roots: list[Path],
                       candidates: list[Path]) -> str:
  where = (f"in {', '.join(map(str, candidates))}" if roots else
           f"anywhere: no data folder is configured and {DATA_DIR_ENV} is unset")
  if isinstance(spec, specs.ImageFolderSpec):
    return (f"{spec.title} not found {where}: looked for an archive "
            f"({', '.join(ARCHIVE_SUFFIXES)}) or a folder holding train/ (no such file or folder, "
            f"or a folder without train/). Set --config.data.dir or {DATA_DIR_ENV} to it. "
            f"{spec.how_to_get}")
  return (f"{spec.title} files not found {where} (looked for {', '.join(spec.all_files)}). "
          f"Set --config.data.dir or {DATA_DIR_ENV} to a folder holding them, directly or as "
          f"{' or '.join(spec.subfolders)} below it. {spec.how_to_get}")
