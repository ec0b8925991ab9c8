"""Reading an image folder or archive (`image_folder`'s sources): its files, their digests, and
one pass that checks every image and stages its bytes for the build.

A source is a folder or a .tar, .tar.gz, .tgz or .zip archive. Hidden files and folders (".*"),
`__MACOSX`, `Thumbs.db` and `desktop.ini` are ignored everywhere. Images are the files named
*.jpg, *.jpeg or *.png (any case) whose content is a JPEG or PNG image (`IMAGE_FORMATS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from array_record.python import array_record_module

from dpjax.data import cache_manifest
from dpjax.data import local_files
from dpjax.data import records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_FORMATS = ("JPEG", "MPO", "PNG")  # MPO: a camera's multi-picture JPEG
IGNORED_NAMES = ("__MACOSX", "Thumbs.db", "desktop.ini")


class ImageFolderError(local_files.DataFormatError):
  """An image folder or archive that cannot be built: the message names the file or folder."""


@dataclasses.dataclass(frozen=True)
class Image:
  """One image file read from the source: its path (below the archive's top or the folder), its
  place in the staging file and its SHA-256."""
  path: PurePosixPath
  position: int
  sha256: str


def sha256_source(source: Path) -> str:
  """SHA-256 of an archive file, or `tree_digest` of the image files of a folder."""
  if source.is_file():
    return cache_manifest.sha256_file(source)
  relative = {PurePosixPath(p.relative_to(source).as_posix()): p for p in source.rglob("*")}
  return tree_digest({rel: cache_manifest.sha256_file(p) for rel, p in relative.items()
                      if p.is_file() and is_image_name(rel.name) and not ignored(rel)})


def tree_digest(sha256s: dict[PurePosixPath, str]) -> str:
  """SHA-256 of the lines "path<TAB>sha256 of the file" of image files (paths below the folder
  holding train/), sorted by path: the same for a folder and an archive of the same images."""
  lines = "".join(f"{path}\t{sha256s[path]}\n" for path in sorted(sha256s, key=str))
  return hashlib.sha256(lines.encode()).hexdigest()


def ignored(path: PurePosixPath) -> bool:
  return any(part.startswith(".") or part in IGNORED_NAMES for part in path.parts)


def is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_SUFFIXES)


def where_in(source: Path, path: str | PurePosixPath) -> str:
  """How messages name `path` of `source`: a file of a folder, or a member of an archive."""
  return str(source / path) if source.is_dir() else f"{source}: {path}"


def members(source: Path) -> Iterator[tuple[PurePosixPath, bytes | None]]:
  """(path, bytes) of each regular file of `source` in the order stored, (path, None) of each
  folder; ignored paths left out. An unreadable archive raises ImageFolderError naming it."""
  def keep(name: str) -> PurePosixPath | None:
    path = PurePosixPath(*[p for p in PurePosixPath(name).parts if p not in ("/", ".")])
    return None if not path.parts or ignored(path) else path

  if source.is_dir():
    for path in sorted(source.rglob("*")):
      rel = keep(path.relative_to(source).as_posix())
      if rel is not None and (path.is_dir() or path.is_file()):
        yield rel, path.read_bytes() if path.is_file() else None
    return
  try:
    if source.name.lower().endswith(".zip"):
      with zipfile.ZipFile(source) as archive:
        for member in archive.infolist():
          if (rel := keep(member.filename)) is not None:
            yield rel, None if member.is_dir() else archive.read(member)
      return
    with tarfile.open(source, "r:*") as archive:  # any compression; members read in order
      for member in archive:
        if (rel := keep(member.name)) is not None and (member.isfile() or member.isdir()):
          yield rel, archive.extractfile(member).read() if member.isfile() else None
      _check_end(archive)
  except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
    raise ImageFolderError(f"{source} is not a readable archive ({type(e).__name__}: {e}): it "
                           "is truncated or corrupt. Replace it.") from e


def _check_end(archive: tarfile.TarFile) -> None:
  """Raises tarfile.ReadError unless the archive read ends with tar's end-of-archive block and its
  compressed stream is complete: tarfile takes a tar cut at a block boundary for a whole one."""
  archive.fileobj.seek(archive.offset)
  if archive.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
    raise tarfile.ReadError("no end-of-archive block after the last member")
  while archive.fileobj.read(1 << 20):  # a truncated gzip/bz2/xz stream raises EOFError here
    pass


@dataclasses.dataclass
class Staged:
  """What one pass over the source found: its images (pixels checked, bytes in the staging
  file), folders and other files, the images' shape (None: no image), and per-channel histograms
  int64 [C, 256] of the pixel values of the images below each pair of top folders (e.g.
  ("train", "cat"), or ("pets", "train") in an archive of one folder pets/)."""
  images: list[Image] = dataclasses.field(default_factory=list)
  folders: list[PurePosixPath] = dataclasses.field(default_factory=list)
  others: list[PurePosixPath] = dataclasses.field(default_factory=list)
  shape: tuple[int, int, int] | None = None
  histograms: dict[tuple[str, ...], np.ndarray] = dataclasses.field(default_factory=dict)


def stage(source: Path, staging: Path, image_shape: Sequence[int] | None) -> Staged:
  """Reads every file of `source` once: decodes each image (JPEG or PNG, of `image_shape` or of
  the first image's shape) and copies its bytes, unchanged, into the ArrayRecord file `staging`."""
  found = Staged(shape=tuple(image_shape) if image_shape else None)
  first = None  # the image whose shape the others must have (None: the declared shape)
  writer = array_record_module.ArrayRecordWriter(str(staging), "group_size:1,uncompressed")
  try:
    for path, data in members(source):
      if data is None or not is_image_name(path.name):
        (found.folders if data is None else found.others).append(path)
        continue
      where = where_in(source, path)
      pixels = _pixels(data, where)
      if found.shape is None:
        found.shape, first = pixels.shape, path
      elif pixels.shape != found.shape:
        other = (f"{where_in(source, first)} (the first image read)" if first else
                 "the declared image shape")
        raise ImageFolderError(f"{where} has shape {pixels.shape} (H, W, C), but {other} has "
                               f"{found.shape}: all images of a dataset must have one shape. "
                               "Resize or convert it, or remove it.")
      group = path.parts[:2]
      found.histograms[group] = found.histograms.get(group, 0) + _histogram(pixels)
      found.images.append(Image(path, len(found.images), hashlib.sha256(data).hexdigest()))
      writer.write(data)
  finally:
    writer.close()
  return found


def _pixels(data: bytes, where: str) -> np.ndarray:
  """uint8 [H, W, C] pixels of a JPEG or PNG file's bytes; ImageFolderError (or
  `records.RecordError`) naming `where` for anything else or a file that does not decode."""
  image = records.open_image(data, where)
  if image.format not in IMAGE_FORMATS:
    raise ImageFolderError(f"{where} holds a {image.format} image, not a JPEG or PNG one. "
                           "Convert it, or remove it.")
  return records.image_pixels(image, where)


def _histogram(pixels: np.ndarray) -> np.ndarray:
  """int64 [C, 256]: how many pixels of `pixels` [H, W, C] have each value, per channel."""
  channels = pixels.shape[-1]
  offsets = np.arange(channels, dtype=np.int32) * 256  # channel c counts at c*256 + value
  return np.bincount((pixels.reshape(-1, channels) + offsets).ravel(),
                     minlength=256 * channels).reshape(channels, 256)
