"""``image-sites``: an institution's own images, one image data set per site.

Each site keeps its images where it likes (an image folder with one sub-folder
per class, or a MedMNIST-layout ``.npz``; see ``fedmeta.data.loaders``) and
names the place in its node config (``data=...``) or, in a simulation, in the
run's ``data-dir`` (``site-0/``, ``site-1/``, ...). The federation agrees on the
classes (``classes``), the channels (``channels``) and the side of the square
input (``image-size``), so the server builds the model without seeing data;
every image is converted and resized to that input. A site is one task, with
the classes' fixed labels (as ``tabular-csv``); evaluation is leave-sites-out
over the site folders of ``data-dir`` beyond the training sites.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedmeta.data.records import Records
from fedmeta.data.tasks.base import TaskError
from fedmeta.data.tasks.tabular import TabularCsv


class SmallImageCNN(nn.Module):
    """conv c-16-32 (3x3), 2x2 pool, adaptive 4x4 pool, 512-64-N: any input size."""

    def __init__(self, channels: int, out_dim: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(512, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ImageSites(TabularCsv):
    name = "image-sites"
    kind = "classification"

    def __init__(
        self,
        n_way: int = 2,
        pool_per_class: int = 40,
        num_sites: int = 10,
        num_classes: int = 2,
        data_dir: str = "",
        image_size: int = 28,
        channels: int = 1,
    ) -> None:
        self.image_size, self.channels = image_size, channels
        super().__init__(
            n_way,
            pool_per_class,
            num_sites,
            num_features=1,
            num_classes=num_classes,
            data_dir=data_dir,
        )

    def build_model(self, out_dim: int) -> nn.Module:
        return SmallImageCNN(self.channels, out_dim)

    def input_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def check(self, records: Records) -> None:
        if len(records) and (records.y.min() < 0 or records.y.max() >= self.num_classes):
            raise TaskError(
                f"image labels outside 0..{self.num_classes - 1}: the site holds "
                f"more classes than the run's classes={self.num_classes}"
            )

    def _load(self, folder: Path) -> Records:
        from fedmeta.data.loaders import DataError, load_data

        try:
            records = load_data(folder, self.input_shape()).records
        except DataError as exc:
            raise TaskError(f"{folder.name}: {exc}") from None
        self.check(records)
        return records

    def site_records(self, site: int) -> Records:
        folder = Path(self.data_dir) / f"site-{site}" if self.data_dir else None
        if folder is not None and folder.is_dir():
            return self._load(folder)
        raise TaskError(
            "image-sites: a site reads its own images (node config data=..., or "
            "data-dir/site-<i> in a simulation); none were found"
        )
