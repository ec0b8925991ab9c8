"""dpjax.data: datasets from local original files, image folders or TFDS, public/private splits,
public batches.

Typical use:
  train = load_dataset("fashion_mnist", "train")            # Dataset, uint8 [N, 28, 28, 1]
  pets = load_dataset("image_folder", "train", "pets.tgz")   # images: RecordImages, read lazily
  c100 = load_dataset("tfds:cifar100", "train", tfds_dir)    # images: TfdsImages, read lazily
  parts = split_dataset(train, public_fraction=0.1, seed=0)  # disjoint public / private
  public_batches = ShuffledBatches(parts.public, batch_size=256, seed=0)
  batch = public_batches.batch(step)                         # image float32, label int32
"""

from dpjax.data.batches import ShuffledBatches
from dpjax.data.batches import ShuffledOrder
from dpjax.data.batches import gather
from dpjax.data.dataset import Dataset
from dpjax.data.dataset import in_memory
from dpjax.data.dataset import load_dataset
from dpjax.data.dataset import normalization
from dpjax.data.dataset import standardize
from dpjax.data.dataset import to_float
from dpjax.data.image_source import ImageFolderError
from dpjax.data.lazy_images import LazyImages
from dpjax.data.local_files import ChecksumError
from dpjax.data.local_files import DataFormatError
from dpjax.data.local_files import read_split
from dpjax.data.locations import DATA_DIR_ENV
from dpjax.data.locations import DataNotFoundError
from dpjax.data.locations import resolve_data_dir
from dpjax.data.records import RecordImages
from dpjax.data.specs import KNOWN_DATASETS
from dpjax.data.specs import get_spec
from dpjax.data.splits import OverlapError
from dpjax.data.splits import PublicPrivate
from dpjax.data.splits import check_disjoint
from dpjax.data.splits import pair_datasets
from dpjax.data.splits import public_private_split
from dpjax.data.splits import split_dataset
from dpjax.data.tfds_cache import CACHE_DIR_ENV
from dpjax.data.tfds_cache import default_cache_dir
from dpjax.data.tfds_cache import ensure_cache
from dpjax.data.tfds_cache import load_tfds_by_name
from dpjax.data.tfds_images import TfdsImages

__all__ = [
    "CACHE_DIR_ENV", "ChecksumError", "DATA_DIR_ENV", "DataFormatError", "DataNotFoundError",
    "Dataset", "ImageFolderError", "KNOWN_DATASETS", "LazyImages", "OverlapError", "PublicPrivate",
    "RecordImages", "ShuffledBatches", "ShuffledOrder", "TfdsImages",
    "check_disjoint", "default_cache_dir", "ensure_cache", "gather", "get_spec", "in_memory",
    "load_dataset",
    "load_tfds_by_name", "normalization", "pair_datasets", "public_private_split", "read_split",
    "resolve_data_dir", "split_dataset", "standardize", "to_float",
]
