"""A TFDS ArrayRecord cache of the local datasets, keyed by the files it was built from; TFDS
datasets by name.

The original files are converted into a TFDS dataset `dpjax_local/<name>` (ArrayRecord files,
Tensor features image/label/index), then read back with `tfds.data_source` (random access, no
TensorFlow needed). TFDS shuffles records when it writes them, so every record carries its
`index` in the original file order and reading puts it back.

Layout: <cache>/dpjax_local/<name>/<entry>/, where <entry> is `cache_manifest.entry_name` of the
SHA-256s of the original files; it holds the TFDS data_dir and manifest.json (`cache_manifest`:
source digests, whether they were verified, the entry's own file digests). Other files get
another entry, never the first one's. An entry is built in a temporary folder beside it (.tmp-*,
deleted if the build fails; a killed build's is ignored and may be deleted) and renamed into
place with its manifest, so an interrupted build never leaves an entry that looks complete.

Which entry `ensure_cache` uses:
- the original files are found: the entry of their digests, built if missing and rebuilt if its
  manifest is missing, unreadable or disagrees with its files (left by an older dpjax, damaged).
  With verify=True the recorded digests must be the official checksums: an entry built with
  verify=False from the official files is then marked verified; one built from other files
  raises ChecksumError.
- they are not found: the one usable entry (with verify=True: whose recorded digests are the
  official ones); entries with the same content count as one. None: DataNotFoundError saying
  why each entry was refused; several different ones: CacheEntryError naming them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from dpjax.data import cache_manifest
from dpjax.data import local_files
from dpjax.data import locations
from dpjax.data import specs

CACHE_DIR_ENV = "DPJAX_CACHE_DIR"
BUILDER_NAME = "dpjax_local"


def default_cache_dir() -> Path:
  """$DPJAX_CACHE_DIR if set, else ~/.cache/dpjax."""
  return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "dpjax").expanduser()


class DpjaxLocal(tfds.core.GeneratorBasedBuilder):
  """TFDS builder over dpjax's local original files; one builder config per dataset.

  Features: image uint8 [H, W, C] (raw bytes), label int64 [], index int64 [] (position in the
  original split). `source` and `verify` are only needed to build, not to read.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original files with an index feature."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in specs.LOCAL_DATASETS]

  def __init__(self, *, source: Path | None = None, verify: bool = True, **kwargs: Any):
    self._source = source
    self._verify = verify
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    spec = specs.get_spec(self.builder_config.name)
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=spec.image_shape, dtype=np.uint8, encoding="bytes"),
        "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        "index": tfds.features.Tensor(shape=(), dtype=np.int64)})
    return tfds.core.DatasetInfo(builder=self, description=f"{spec.title} from local files.",
                                 features=features, supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager: Any) -> Mapping[str, Iterator[tuple[int, dict]]]:
    del dl_manager
    return {split: self._generate_examples(split) for split in specs.SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    if self._source is None:
      raise ValueError("DpjaxLocal needs `source` (the original files) to build the cache.")
    images, labels = local_files.read_split(self.builder_config.name, split, self._source,
                                            self._verify)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": label, "index": i}


def ensure_cache(name: str, cache_dir: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike | None = None, verify: bool = True) -> Path:
  """Returns the cache entry of `name` (a TFDS data_dir) to read, building it if needed.

  Args:
    name: a dataset in `specs.LOCAL_DATASETS`.
    cache_dir: cache root; default `default_cache_dir()`.
    data_dir: configured folder of the original files (see `locations.resolve_data_dir`); when
      they are found, the entry built from exactly these files is used.
    verify: require the official release: when building (see `local_files`), and of an existing
      entry's recorded source digests (see the module docstring).

  Raises:
    local_files.ChecksumError: verify=True and the files (or those an entry was built from
      without them) are not the official release.
    local_files.DataFormatError: an original file is corrupt; the message names it.
    locations.DataNotFoundError: no original files and no usable entry.
    cache_manifest.CacheEntryError: no original files and several usable entries that differ.
  """
  spec = specs.local_spec(name)
  root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  folder = root / BUILDER_NAME / name
  try:
    source = locations.resolve_data_dir(name, data_dir)
  except locations.DataNotFoundError as not_found:
    return _entry_without_source(spec, folder, verify, not_found)
  sha256s = cache_manifest.source_sha256(spec, source)
  entry = folder / cache_manifest.entry_name(sha256s)
  manifest = _trusted(spec, entry)
  if manifest is None or _sha256s(manifest) != sha256s:
    cache_manifest.discard(entry)
    manifest = _build(spec, entry, source, sha256s, verify)
  if verify:
    problems = cache_manifest.official_mismatches(spec, manifest)
    if problems:
      raise local_files.ChecksumError(
          f"The {spec.title} files in {source} are not the official release: "
          f"{'; '.join(problems)} (recorded when the cache entry {entry} was built from them). "
          "The files are corrupt, truncated or not the original: delete them and download them "
          "again, or pass verify=False to use them anyway.")
    cache_manifest.mark_verified(entry, manifest)
  return entry


def _read(spec: specs.DatasetSpec, entry: Path) -> cache_manifest.Manifest:
  """The manifest of `entry`; CacheEntryError saying why if it cannot be trusted."""
  return cache_manifest.read(entry, spec.name, str(DpjaxLocal.VERSION))


def _trusted(spec: specs.DatasetSpec, entry: Path) -> cache_manifest.Manifest | None:
  """The manifest of `entry` if it can be trusted, else None."""
  try:
    return _read(spec, entry)
  except cache_manifest.CacheEntryError:
    return None


def _sha256s(manifest: cache_manifest.Manifest) -> dict[str, str]:
  return {name: digests["sha256"] for name, digests in manifest.sources.items()}


def _build(spec: specs.DatasetSpec, entry: Path, source: Path, sha256s: dict[str, str],
           verify: bool) -> cache_manifest.Manifest:
  """Converts the original files into the entry `entry` (`cache_manifest.build`: whole or not at
  all); returns its manifest."""

  def fill(temporary: Path) -> cache_manifest.Manifest:
    builder = DpjaxLocal(config=spec.name, data_dir=temporary, source=source, verify=verify,
                         file_format="array_record")
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    shutil.rmtree(temporary / "downloads", ignore_errors=True)  # TFDS's empty download folder
    sources = {name: {"sha256": sha256s[name],
                      "content_md5": cache_manifest.content_md5(spec, path)}
               for name, path in cache_manifest.source_files(spec, source).items()}
    if cache_manifest.source_sha256(spec, source) != sha256s:
      raise RuntimeError(f"The files in {source} changed while the cache was built from them; "
                         "run again once nothing writes to them.")
    return cache_manifest.Manifest(
        dataset=spec.name, builder_version=str(DpjaxLocal.VERSION), source=str(source),
        sources=sources, verified=verify,
        num_examples={s: builder.info.splits[s].num_examples for s in specs.SPLITS}, files={})

  return cache_manifest.build(entry, fill, lambda e: _trusted(spec, e))


def _entry_without_source(spec: specs.DatasetSpec, folder: Path, verify: bool,
                          not_found: locations.DataNotFoundError) -> Path:
  """The one usable entry of `folder` when the original files are not there (see the module
  docstring); raises `not_found`, extended with why each entry was refused, if there is none."""
  usable, refused = [], []
  for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
    if entry.name.startswith("."):  # a build in progress or left by a killed one
      continue
    try:
      manifest = _read(spec, entry)
    except cache_manifest.CacheEntryError as e:
      refused.append(str(e))
      continue
    problems = cache_manifest.official_mismatches(spec, manifest) if verify else []
    if problems:
      refused.append(f"{entry} was built from files that are not the official release "
                     f"({'; '.join(problems)})")
    else:
      usable.append((entry, manifest))
  if not usable:
    why = (f" None of the cached copies in {folder} may be used: {'; '.join(refused)}."
           if refused else "")
    raise locations.DataNotFoundError(f"{not_found}{why}")
  if len({_content(m) for _, m in usable}) > 1:
    raise cache_manifest.CacheEntryError(
        f"The {spec.title} files were not found and the cache {folder} holds copies built from "
        f"different files: {', '.join(f'{e.name} (from {m.source})' for e, m in usable)}. Point "
        "data.dir at the files to use, or delete the entries you do not want.")
  entry, manifest = usable[0]
  if verify:
    cache_manifest.mark_verified(entry, manifest)
  return entry


def _content(manifest: cache_manifest.Manifest) -> tuple[tuple[str, str], ...]:
  """What identifies an entry's data: the content md5s (equal for gzip files that differ only in
  their headers, like Debian's Fashion-MNIST)."""
  return tuple(sorted((name, d["content_md5"]) for name, d in manifest.sources.items()))


def read_cached_split(name: str, split: str, cache_root: Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split of the cache entry `cache_root` (what `ensure_cache` returned) in
  original order.

  Returns:
    (images, labels): images [N, H, W, C] uint8, labels [N] int32.
  """
  specs.check_split(split)
  source = tfds.data_source(f"{BUILDER_NAME}/{name}", split=split, data_dir=cache_root,
                            download=False,
                            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  images, labels, index = _parse_records(source.__getitems__(range(len(source))))
  return _put_in_order(images.reshape(-1, *specs.get_spec(name).image_shape), labels, index)


def _parse_records(records: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Parses serialized tf.Examples (TFDS's own proto, no TensorFlow): flat image bytes [N*HWC],
  labels [N], index [N]. Much faster than TFDS's generic per-example NumPy decoder."""
  features = [tf_example_pb2.Example.FromString(r).features.feature for r in records]
  images = np.frombuffer(b"".join([f["image"].bytes_list.value[0] for f in features]), np.uint8)
  labels = np.array([f["label"].int64_list.value[0] for f in features], np.int32)
  index = np.array([f["index"].int64_list.value[0] for f in features], np.int64)
  return images, labels, index


def _put_in_order(images: np.ndarray, labels: np.ndarray,
                  index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Undoes TFDS's write shuffle: returns the arrays with example i at position index[i]."""
  if not np.array_equal(np.sort(index), np.arange(len(index))):
    raise ValueError("Corrupt dpjax cache: the index field is not a permutation; delete the "
                     "cache folder to rebuild it.")
  order = np.argsort(index)
  return images[order], labels[order]


def load_tfds_by_name(name: str, split: str, data_dir: str | os.PathLike | None = None,
                      **kwargs: Any) -> Sequence[Mapping[str, Any]]:
  """Random-access source of any TFDS dataset (downloads and prepares it if needed).

  Thin wrapper around `tfds.data_source`; records are dicts of NumPy arrays as TFDS decodes them.
  Needs network access the first time, and the dataset must support the ArrayRecord format.
  """
  return tfds.data_source(name, split=split, data_dir=data_dir, **kwargs)
