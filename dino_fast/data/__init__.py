"""Data paths: DINO multi-crop augmentation (torchvision and DALI), ImageFolder reader, demo dataset.

The trainer and the benchmarks build their loader with :func:`build_train_data`."""
from dino_fast.data.build import TrainData, build_train_data
from dino_fast.data.demo import make_demo_dataset
from dino_fast.data.folder import DataError, ImageFolderDataset, collate_views
from dino_fast.data.transforms import DataAugmentationDINO

__all__ = ["DataAugmentationDINO", "ImageFolderDataset", "DataError", "TrainData", "build_train_data",
           "collate_views", "make_demo_dataset"]
