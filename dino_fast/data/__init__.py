"""Data paths: DINO multi-crop augmentation (torchvision and DALI), image folders and tar shards, demo dataset.

The trainer and the benchmarks build their loader with :func:`build_train_data`; users who want the
recipe elsewhere take :class:`DINOMultiCrop`."""
from dino_fast.data.build import TrainData, build_train_data
from dino_fast.data.demo import make_demo_dataset
from dino_fast.data.folder import DataError, ImageFolderDataset, collate_views
from dino_fast.data.listing import list_folder
from dino_fast.data.multicrop import DINOMultiCrop
from dino_fast.data.shards import ShardDataset, open_dataset
from dino_fast.data.transforms import DataAugmentationDINO

__all__ = ["DINOMultiCrop", "DataAugmentationDINO", "ImageFolderDataset", "ShardDataset", "DataError", "TrainData",
           "build_train_data", "collate_views", "list_folder", "make_demo_dataset", "open_dataset"]
