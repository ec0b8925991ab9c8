"""Static facts about the datasets dpjax reads from local files.

One `DatasetSpec` per dataset: file names, checksums, shapes, class counts and normalisation
constants. Every other module of `dpjax.data` looks these up here instead of repeating them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a dataset looks like on disk and in memory.

  Attributes:
    name: dpjax's name for it ("mnist", "fashion_mnist", "cifar10").
    title: human-readable name used in messages.
    file_format: "idx" (gzip'd IDX files) or "cifar" (pickled CIFAR batches).
    files: split -> file names. IDX: (images file, labels file); CIFAR: the batch files.
    md5: file name -> md5. IDX: of the *decompressed* bytes, keyed by the name without ".gz";
      CIFAR: of the tarball.
    num_examples: split -> number of examples in the official release.
    image_shape: (H, W, C) of one image.
    num_classes: labels are in [0, num_classes).
    mean: per-channel mean of the training images scaled to [0, 1], length C.
    std: per-channel standard deviation of the same, length C.
    subfolders: names tried below a data root before the root itself (folders or a tarball).
    system_dir: a folder an OS package installs the files to, if any.
    how_to_get: one sentence telling the user how to obtain the files.
  """
  name: str
  title: str
  file_format: str
  files: Mapping[str, tuple[str, ...]]
  md5: Mapping[str, str]
  num_examples: Mapping[str, int]
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  subfolders: tuple[str, ...]
  system_dir: str | None = None
  how_to_get: str = ""

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

KNOWN_DATASETS = tuple(_SPECS)


def get_spec(name: str) -> DatasetSpec:
  """Returns the spec of `name`; raises ValueError naming the known datasets otherwise."""
  if name not in _SPECS:
    raise ValueError(f"Unknown dataset {name!r}; known local datasets: "
                     f"{', '.join(KNOWN_DATASETS)}. For any other TFDS dataset use "
                     "dpjax.data.load_tfds_by_name.")
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
