"""Image-folder datasets: split/class/*.{jpg,jpeg,png} in a folder or an archive, built once into
a checksummed cache of ArrayRecord records (`records`) and read lazily.

Layout of the source (a folder, or a .tar, .tar.gz, .tgz or .zip archive, possibly with one folder
around it): `train/<class>/<image>` and optionally `test/<class>/<image>`; no other top-level
folders. Every file in a split must be a JPEG or PNG image (by name and content) in a class
folder; files beside the split folders (a README) and those `image_source` ignores (hidden files,
`__MACOSX`, ...) are ignored. Both splits must have the same classes,
none of them empty. Labels follow the class order: the sorted folder names, or the order given
(cifar10_jpeg: its spec's). Every image must decode with Pillow to one shape [H, W, C] (or the
shape declared): pixels as stored, no resizing, no EXIF rotation (`records.image_pixels`).

Example order: a split's files sorted by (label, path), then permuted by a fixed permutation of
their count (`ORDER_SEED`), so that any prefix of a split (data.train_examples, a probe's first
examples) mixes the classes. Example i is record i of `<split>.array_record`, the file of
`<split>.paths.json`[i] (its path in the source), with label `<split>.labels.npy`[i].

Cache: <cache>/dpjax_records/<name>/<entry>/, the entry keyed by the SHA-256 of the archive (of
the image files, `tree_digest`, for a folder) and the class order given. It holds the records, the
labels and paths, `info.json` (`FolderInfo`: classes, image shape, the training split's
per-channel mean and std, the images' tree digest) and `manifest.json` (`cache_manifest`: source
digests, the digests of the entry's files). It is built whole in a temporary folder and renamed
into place (`cache_manifest.build`); an entry whose files changed is rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from array_record.python import array_record_module

from dpjax.data import cache_manifest
from dpjax.data import image_source
from dpjax.data import local_files
from dpjax.data import locations
from dpjax.data import records
from dpjax.data import specs
from dpjax.data.image_source import ImageFolderError

BUILDER_VERSION = "1.0.0"
CACHE_FOLDER = "dpjax_records"
INFO = "info.json"
ORDER_SEED = 0x1F01D  # the fixed permutation of each split's examples (module docstring)
PATHS_SUFFIX = ".paths.json"
_STAGING = "staging.array_record"
_CHUNK = 1024  # records copied at a time from the staging file


@dataclasses.dataclass(frozen=True)
class FolderInfo:
  """What a built entry holds (its info.json).

  classes: class folder names in label order. image_shape: (H, W, C) of every image.
  num_examples: split -> examples. mean, std: per-channel statistics [C] of the training images
  scaled to [0, 1] (computed from them: private when the training split is). tree_sha256: the
  image files' `tree_digest`.
  """
  classes: tuple[str, ...]
  image_shape: tuple[int, int, int]
  num_examples: dict[str, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  tree_sha256: str


def load(name: str, split: str, data_dir: str | os.PathLike | None = None,
         cache_dir: str | os.PathLike | None = None, verify: bool = True,
         classes: Sequence[str] | None = None,
         image_shape: Sequence[int] | None = None) -> tuple[records.RecordImages, np.ndarray,
                                                            FolderInfo]:
  """Split `split` of the image-folder dataset `name`, building its cache entry if needed.

  Args:
    name: "cifar10_jpeg" (found as `locations.resolve_data_dir` says) or "image_folder" (the
      folder or archive `data_dir` names).
    split: "train" or "test".
    data_dir, cache_dir: as `dataset.load_dataset`'s.
    verify: cifar10_jpeg: the archive (or the extracted images) must be the official copy
      (PROVENANCE.md's SHA-256). No effect on "image_folder", which has no official copy.
    classes: "image_folder" only: class folder names in label order (None: sorted names).
    image_shape: "image_folder" only: (H, W, C) every image must have (None: the first one's).

  Returns:
    (images, labels, info): images lazy uint8 [N, H, W, C], labels int32 [N], the entry's info.

  Raises:
    locations.DataNotFoundError: no such archive or folder.
    local_files.ChecksumError: verify=True and the copy is not the official one.
    ImageFolderError: a bad folder (naming the file or folder): an unreadable archive, image or
      class layout, an empty class, classes that differ between splits, an image of another
      shape.
  """
  spec = specs.get_spec(name)
  specs.check_split(split)
  if spec.classes and classes:
    raise ValueError(f"{name} has its own classes; classes can be given for image_folder only.")
  if spec.image_shape and image_shape:
    raise ValueError(f"{name} has its own image shape; it can be given for image_folder only.")
  source = locations.resolve_data_dir(name, data_dir)
  root = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
  entry = ensure_entry(spec, source, root / CACHE_FOLDER / name, verify,
                       tuple(spec.classes or classes or ()), image_shape or spec.image_shape)
  info = read_info(entry)
  if split not in info.num_examples:
    raise ImageFolderError(f"{source} has no {split}/ folder (it has "
                           f"{', '.join(sorted(info.num_examples))}). Add {split}/<class>/ "
                           "images to it.")
  labels = records.read_labels(entry, split)
  images = records.RecordImages(entry, split, info.image_shape, len(labels))
  return images, labels, info


def _default_cache_dir() -> Path:
  from dpjax.data import tfds_cache  # here: importing TFDS is slow, and reading needs none of it
  return tfds_cache.default_cache_dir()


def ensure_entry(spec: specs.ImageFolderSpec, source: Path, folder: Path, verify: bool,
                 classes: tuple[str, ...], image_shape: Sequence[int] | None) -> Path:
  """The entry below `folder` built from `source` with `classes` in label order (() for the
  sorted folder names): built if missing or untrusted. Raises ImageFolderError if `image_shape`
  is given and the images have another."""
  if len(set(classes)) != len(classes):
    raise ValueError(f"The classes given repeat a name: {list(classes)}.")
  digest = image_source.sha256_source(source)
  official = {spec.sha256, spec.tree_sha256} - {None}
  if verify and official and digest not in official:
    what = "of its image files" if source.is_dir() else "of the archive"
    raise local_files.ChecksumError(
        f"{source} is not the official {spec.title} copy: SHA-256 {digest} ({what}), expected "
        f"{spec.sha256} (the archive {spec.archive}) or {spec.tree_sha256} (its image files, "
        "extracted). It is corrupt, truncated or another copy: replace it, or pass verify=False "
        "to use it anyway.")
  entry = folder / cache_manifest.entry_name({"source": digest, "classes": "\n".join(classes)})
  manifest = _trusted(spec, entry)
  if manifest is None or manifest.sources.get("source", {}).get("sha256") != digest:
    cache_manifest.discard(entry)
    manifest = _build(spec, entry, source, digest, classes, image_shape, digest in official)
  if digest in official:
    cache_manifest.mark_verified(entry, manifest)
  info = read_info(entry)
  if image_shape and tuple(image_shape) != info.image_shape:
    first = image_source.where_in(source, read_paths(entry, "train")[0])
    raise ImageFolderError(f"{first} (like every image of {source}) has shape "
                           f"{info.image_shape}, not the declared {tuple(image_shape)}.")
  return entry


def read_info(entry: Path) -> FolderInfo:
  """The `FolderInfo` of a built entry."""
  data = json.loads((entry / INFO).read_text())
  return FolderInfo(classes=tuple(data["classes"]), image_shape=tuple(data["image_shape"]),
                    num_examples=dict(data["num_examples"]), mean=tuple(data["mean"]),
                    std=tuple(data["std"]), tree_sha256=data["tree_sha256"])


def read_paths(entry: Path, split: str) -> list[str]:
  """[N]: the path in the source of each example of `split`, in index order."""
  return json.loads((entry / f"{split}{PATHS_SUFFIX}").read_text())


def _trusted(spec: specs.ImageFolderSpec, entry: Path) -> cache_manifest.Manifest | None:
  try:
    return cache_manifest.read(entry, spec.name, BUILDER_VERSION)
  except cache_manifest.CacheEntryError:
    return None


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The splits of a source: prefix (the folder around them in an archive, or ""), classes in
  label order, and split -> class -> its images."""
  prefix: PurePosixPath
  classes: tuple[str, ...]
  splits: dict[str, dict[str, list[image_source.Image]]]


def _layout(source: Path, found: image_source.Staged, classes: tuple[str, ...]) -> _Layout:
  """Sorts the images into splits and classes; ImageFolderError naming the file or folder that
  breaks the layout of the module docstring."""
  every = [im.path for im in found.images] + found.folders + found.others
  tops = sorted({p.parts[0] for p in every})
  wrapped = (len(tops) == 1 and source.is_file() and tops[0] not in specs.SPLITS
             and PurePosixPath(tops[0], "train") in found.folders + [
                 PurePosixPath(*im.path.parts[:2]) for im in found.images])
  if "train" not in tops and not wrapped:
    raise ImageFolderError(
        f"{source} has no train/ folder{' (nor one folder holding it)' * source.is_file()}: its "
        f"top level holds {', '.join(tops) or 'nothing'}. Expected train/<class>/<image> "
        "(.jpg, .jpeg or .png) and, optionally, test/<class>/<image>.")
  prefix = PurePosixPath(tops[0]) if wrapped else PurePosixPath()
  where = lambda *parts: image_source.where_in(source, prefix.joinpath(*parts))
  relative = lambda p: p.parts[len(prefix.parts):]
  splits: dict[str, dict[str, list[image_source.Image]]] = {}

  def split_of(parts: tuple[str, ...]) -> dict[str, list[image_source.Image]]:
    if parts[0] not in specs.SPLITS:
      raise ImageFolderError(f"{where(parts[0])} is not a split: the top level may hold only "
                             f"{' and '.join(f'{s}/' for s in specs.SPLITS)}.")
    return splits.setdefault(parts[0], {})

  for path in found.folders:
    parts = relative(path)
    if len(parts) > 2:
      raise ImageFolderError(f"{where(*parts)}/ is a folder inside a class folder; images "
                             "must be directly in <split>/<class>/.")
    if parts:
      by_class = split_of(parts)
      if len(parts) == 2:
        by_class.setdefault(parts[1], [])
  for path in found.others:
    parts = relative(path)
    if len(parts) > 1:  # files beside the split folders (a README) are ignored
      split_of(parts)
      raise ImageFolderError(f"{where(*parts)} is not a .jpg, .jpeg or .png image, and a "
                             "split folder may hold only images in class folders. Remove it.")
  for image in found.images:
    parts = relative(image.path)
    if len(parts) != 3:
      raise ImageFolderError(f"{where(*parts)} is not in a class folder: images must be "
                             "at <split>/<class>/<image>.")
    split_of(parts).setdefault(parts[1], []).append(image)
  return _Layout(prefix, _check_classes(splits, classes, where), splits)


def _check_classes(splits: dict[str, dict[str, list[image_source.Image]]],
                   classes: tuple[str, ...], where) -> tuple[str, ...]:
  """The class order (`classes`, or train's sorted folder names) once every split has exactly
  those classes, none empty; ImageFolderError naming the folder otherwise."""
  if "train" not in splits:
    raise ImageFolderError(f"{where('train')}/ is missing: a dataset needs a training split.")
  order = classes or tuple(sorted(splits["train"]))
  for split in [s for s in specs.SPLITS if s in splits]:
    by_class = splits[split]
    for name, images in sorted(by_class.items()):
      if not images:
        raise ImageFolderError(f"{where(split, name)}/ holds no images: remove the empty "
                               "class folder, or add its images.")
      if name not in order:
        raise ImageFolderError(
            f"{where(split, name)}/ is a class that "
            f"{'the classes given' if classes else where('train') + '/'} do not have "
            f"({', '.join(order)}): every split needs the same class folders.")
    for name in order:
      if name not in by_class:
        have = (f"the classes given include {name!r}" if classes else
                f"{where('train', name)}/ has {len(splits['train'][name])} images")
        raise ImageFolderError(f"{where(split, name)}/ is missing ({have}): every split "
                               "needs the same class folders.")
  return order


def _write_split(folder: Path, split: str, layout: _Layout, shape: tuple[int, int, int],
                 staging: array_record_module.ArrayRecordReader) -> int:
  """Writes `split`'s records, labels and paths in index order (the module docstring)."""
  items = sorted((label, str(image.path), image) for label, name in enumerate(layout.classes)
                 for image in layout.splits[split][name])
  items = [items[k] for k in np.random.default_rng(ORDER_SEED).permutation(len(items))]

  def in_order() -> Iterator[records.Record]:
    for start in range(0, len(items), _CHUNK):
      chunk = items[start:start + _CHUNK]
      payloads = staging.read([image.position for _, _, image in chunk])
      for i, ((label, _, _), payload) in enumerate(zip(chunk, payloads), start):
        yield records.Record(i, label, shape, False, payload)

  count = records.write_split(folder, split, in_order())
  (folder / f"{split}{PATHS_SUFFIX}").write_text(json.dumps([path for _, path, _ in items]))
  return count


def _info(layout: _Layout, found: image_source.Staged,
          num_examples: dict[str, int]) -> FolderInfo:
  """The entry's FolderInfo: the training images' per-channel mean and std on [0, 1]."""
  train = sum(counts for group, counts in found.histograms.items()
              if group[len(layout.prefix.parts)] == "train")
  values = np.arange(256) / 255.0
  mean = train @ values / train.sum(1)
  var = train @ values ** 2 / train.sum(1) - mean ** 2
  every = {PurePosixPath(*image.path.parts[len(layout.prefix.parts):]): image.sha256
           for by_class in layout.splits.values() for images in by_class.values()
           for image in images}
  return FolderInfo(classes=layout.classes, image_shape=found.shape, num_examples=num_examples,
                    mean=tuple(mean.tolist()), std=tuple(np.sqrt(np.maximum(var, 0)).tolist()),
                    tree_sha256=image_source.tree_digest(every))


def _build(spec: specs.ImageFolderSpec, entry: Path, source: Path, digest: str,
           classes: tuple[str, ...], image_shape: Sequence[int] | None,
           verified: bool) -> cache_manifest.Manifest:
  """Reads, checks and writes the whole source into `entry` (`cache_manifest.build`)."""

  def fill(temporary: Path) -> cache_manifest.Manifest:
    staging = temporary / _STAGING
    found = image_source.stage(source, staging, image_shape)
    layout = _layout(source, found, classes)
    reader = array_record_module.ArrayRecordReader(str(staging), "readahead_buffer_size:0")
    try:
      num_examples = {split: _write_split(temporary, split, layout, found.shape, reader)
                      for split in specs.SPLITS if split in layout.splits}
    finally:
      reader.close()
    staging.unlink()
    info = _info(layout, found, num_examples)
    (temporary / INFO).write_text(json.dumps(dataclasses.asdict(info), indent=1))
    read = info.tree_sha256 if source.is_dir() else cache_manifest.sha256_file(source)
    if read != digest:
      raise RuntimeError(f"{source} changed while the cache was built from it; run again once "
                         "nothing writes to it.")
    return cache_manifest.Manifest(
        dataset=spec.name, builder_version=BUILDER_VERSION, source=str(source),
        sources={"source": {"name": source.name, "sha256": digest,
                            "tree_sha256": info.tree_sha256}},
        verified=verified, num_examples=num_examples, files={})

  return cache_manifest.build(entry, fill, lambda e: _trusted(spec, e))
