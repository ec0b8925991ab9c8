"""What a cache entry was built from, and whether it may be used: its manifest.

An entry of the dataset cache (`tfds_cache`) is a folder named after the SHA-256 digests of the
original files it was built from, holding `manifest.json`:

  dataset, builder_version   what was built, by which version of the builder
  source                     where the original files were (for messages only)
  sources                    file name -> {"sha256": of the file, "content_md5": of what the
                             official checksum is taken of (decompressed IDX bytes, the tarball)}
  verified                   whether the files passed `verify=True` (official checksums, counts)
  num_examples               split -> examples in the entry
  files                      path in the entry -> SHA-256 of the entry's own files

The manifest is written last and the entry renamed into place whole (`build`), so an entry
without a readable manifest is left over from another version or damaged: `read` refuses it, as it
refuses an entry whose files changed since they were written (`discard` moves such an entry out
of the way). `official_mismatches` compares the recorded digests with the official checksums
without reading the original files again. The image-folder cache (`image_folder`) keeps its
entries the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from dpjax.data import local_files
from dpjax.data import specs

MANIFEST = "manifest.json"
FORMAT = 1


class CacheEntryError(ValueError):
  """A cache entry cannot be trusted (no manifest, another format, changed files) or chosen."""


@dataclasses.dataclass(frozen=True)
class Manifest:
  """The contents of manifest.json (see the module docstring)."""
  dataset: str
  builder_version: str
  source: str
  sources: dict[str, dict[str, str]]
  verified: bool
  num_examples: dict[str, int]
  files: dict[str, str]


def source_files(spec: specs.DatasetSpec, source: Path) -> dict[str, Path]:
  """File name -> path of the original files under `source` (`locations.resolve_data_dir`)."""
  if source.is_file():  # a tarball
    return {source.name: source}
  return {name: source / name for name in spec.all_files}


def sha256_file(path: Path) -> str:
  """Hex SHA-256 of the file at `path`, read in chunks."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def source_sha256(spec: specs.DatasetSpec, source: Path) -> dict[str, str]:
  """File name -> SHA-256 of each original file under `source` (what an entry is keyed by)."""
  return {name: sha256_file(path) for name, path in source_files(spec, source).items()}


def content_md5(spec: specs.DatasetSpec, path: Path) -> str:
  """md5 of what an official checksum is taken of: an IDX file's decompressed bytes, a CIFAR
  file itself. Raises `local_files.DataFormatError` naming a .gz file that does not decompress."""
  if spec.file_format == "idx":
    return local_files.md5_hex(local_files.idx_bytes(path))
  return local_files.file_md5_hex(path)


def entry_name(sha256s: dict[str, str]) -> str:
  """The folder name of the entry built from files with these SHA-256s (24 hex digits)."""
  text = json.dumps(sorted(sha256s.items()))
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def tree_sha256(entry: Path) -> dict[str, str]:
  """Path relative to `entry` -> SHA-256 of each of the entry's own files: every file below it
  but the manifest and a manifest being written (`write`)."""
  return {str(p.relative_to(entry)): sha256_file(p) for p in sorted(entry.rglob("*"))
          if p.is_file() and p != entry / MANIFEST and not p.name.startswith(f".{MANIFEST}.")}


def official_mismatches(spec: specs.DatasetSpec, manifest: Manifest) -> list[str]:
  """How the recorded sources differ from the official release (empty: they are it).

  Compares each recorded content md5 with the official checksum (`specs.official_md5`) and the
  recorded example counts with the official ones: what `verify=True` checks when it reads files.
  """
  problems = []
  for name, digests in sorted(manifest.sources.items()):
    official = specs.official_md5(spec, name)
    if official is not None and digests.get("content_md5") != official:
      problems.append(f"{name} has md5 {digests.get('content_md5')}, the official release "
                      f"{official}")
  if manifest.num_examples != dict(spec.num_examples):
    problems.append(f"{manifest.num_examples} examples, the official release "
                    f"{dict(spec.num_examples)}")
  return problems


def write(entry: Path, manifest: Manifest) -> None:
  """Writes entry/manifest.json atomically (a temporary file renamed over it)."""
  temporary = entry / f".{MANIFEST}.{uuid.uuid4().hex}"
  temporary.write_text(json.dumps({"format": FORMAT, **dataclasses.asdict(manifest)}, indent=1,
                                  sort_keys=True))
  os.replace(temporary, entry / MANIFEST)


def mark_verified(entry: Path, manifest: Manifest) -> None:
  """Records that `entry`'s sources passed the official checks (the caller made them)."""
  if not manifest.verified:
    write(entry, dataclasses.replace(manifest, verified=True))


def read(entry: Path, dataset: str, builder_version: str) -> Manifest:
  """The manifest of `entry`, checked against the entry's files.

  Raises:
    CacheEntryError: saying why the entry cannot be trusted: no manifest (an entry left by an
      older dpjax), an unreadable one or one of another format, dataset or builder version, or
      files that are missing, extra or changed.
  """
  path = entry / MANIFEST
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise CacheEntryError(f"{entry} has no {MANIFEST} (an entry left by an older dpjax, or "
                          "not an entry).") from e
  except (OSError, ValueError) as e:
    raise CacheEntryError(f"{path} is unreadable ({e}).") from e
  if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
    raise CacheEntryError(f"{path} is not a manifest of format {FORMAT}.")
  try:
    manifest = Manifest(**data)
  except TypeError as e:
    raise CacheEntryError(f"{path} lacks or has unknown fields ({e}).") from e
  if (manifest.dataset, manifest.builder_version) != (dataset, builder_version):
    raise CacheEntryError(f"{path} describes {manifest.dataset} built by version "
                          f"{manifest.builder_version}, not {dataset} by {builder_version}.")
  actual = tree_sha256(entry)
  if actual != manifest.files:
    changed = sorted(set(actual.items()) ^ set(manifest.files.items()))
    raise CacheEntryError(f"the files of {entry} differ from those its manifest lists "
                          f"({', '.join(sorted({k for k, _ in changed}))}).")
  return manifest


def discard(entry: Path) -> None:
  """Moves an untrusted entry out of the way in one rename, then deletes it; no-op if absent."""
  stale = entry.parent / f".stale-{uuid.uuid4().hex}"
  try:
    os.rename(entry, stale)
  except FileNotFoundError:
    return
  shutil.rmtree(stale, ignore_errors=True)


def build(entry: Path, fill: Callable[[Path], Manifest],
          trusted: Callable[[Path], Manifest | None]) -> Manifest:
  """Builds `entry` whole or not at all, and returns its manifest.

  `fill(folder)` writes the entry's files into a new temporary folder beside `entry` (.tmp-*,
  deleted if anything fails; a killed build's is ignored and may be deleted) and returns its
  manifest; its `files` field is replaced by the digests of what `fill` wrote. The manifest is
  written last and the folder renamed to `entry`. Another process placing the same entry first is
  fine if `trusted(entry)` (the caller's `read`, None when the entry cannot be trusted) accepts it.
  """
  entry.parent.mkdir(parents=True, exist_ok=True)
  temporary = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex}"
  try:
    temporary.mkdir()
    manifest = fill(temporary)
    write(temporary, dataclasses.replace(manifest, files=tree_sha256(temporary)))
    try:
      os.rename(temporary, entry)
    except OSError:  # another process placed the entry first: fine if it is the same one
      if trusted(entry) is None:
        raise
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  manifest = trusted(entry)
  if manifest is None:
    raise CacheEntryError(f"The cache entry {entry} changed as it was written.")
  return manifest
