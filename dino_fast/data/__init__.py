"""Data paths: DINO multi-crop augmentation (torchvision), ImageFolder reader, demo dataset."""
from dino_fast.data.demo import make_demo_dataset
from dino_fast.data.folder import DataError, ImageFolderDataset, build_train_loader, collate_views
from dino_fast.data.transforms import DataAugmentationDINO

__all__ = ["DataAugmentationDINO", "ImageFolderDataset", "DataError", "build_train_loader", "collate_views",
           "make_demo_dataset"]
