"""A TFDS ArrayRecord cache of the local datasets, and TFDS datasets by name.

The original files are converted once into a TFDS dataset `dpjax_local/<name>` (ArrayRecord
files, Tensor features image/label/index) under the cache folder, then read back with
`tfds.data_source` (random access, no TensorFlow needed). TFDS shuffles records when it writes
them, so every record carries its `index` in the original file order and reading puts it back.

The cache is keyed by dataset name and `DpjaxLocal.VERSION` only: delete
<cache>/dpjax_local/<name> to rebuild it from other files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

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
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in specs.KNOWN_DATASETS]

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
  """Builds the TFDS cache of `name` unless it exists; returns the cache root folder.

  Args:
    name: a dataset in `specs.KNOWN_DATASETS`.
    cache_dir: cache root; default `default_cache_dir()`.
    data_dir: configured folder of the original files (see `locations.resolve_data_dir`); only
      looked at when the cache has to be built.
    verify: require the official release when building (see `local_files`).
  """
  specs.get_spec(name)
  root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  if not is_cached(name, root):
    _build(name, root, data_dir, verify)
  return root


def is_cached(name: str, cache_root: Path) -> bool:
  """Whether the cache of `name` under `cache_root` is complete."""
  builder = DpjaxLocal(config=name, data_dir=cache_root)
  return builder.data_path.exists() and builder.is_prepared()


def _build(name: str, root: Path, data_dir: str | os.PathLike | None, verify: bool) -> None:
  """Converts the original files into the cache; tolerates another process winning the race."""
  source = locations.resolve_data_dir(name, data_dir)
  builder = DpjaxLocal(config=name, data_dir=root, source=source, verify=verify,
                       file_format="array_record")
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except OSError:  # TFDS renames its temporary folder; that fails if another process was first
    if not is_cached(name, root):
      raise


def read_cached_split(name: str, split: str, cache_root: Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split of the cache in original order.

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
