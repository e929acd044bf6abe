"""ImageFolder-style datasets whose label space is a class-list data file (ImageNet subsets, merged classes).

Directory layout: `<root>/<folder>/*.{JPEG,jpg,jpeg,png}` (for ImageNet the folders are WordNet ids such as
`n01440764`).

Class-list file format (also in `bench/data/classlists/README.md`):

    # comment lines and blank lines are ignored; a `#` after the entries starts a trailing comment
    <merged_name> <folder1> [<folder2> ...]

One merged class per line. Its label is its position among the merged classes in the file (0-based), and it owns
every image of every listed folder. Names and folders are single whitespace-free tokens; a merged name may occur once
and a folder may belong to one merged class only. KIND merges the ImageNet-1K wnids into 611 classes by WordNet
superclass (150 for pre-training, 461 novel); those lists are not public, so only `classlists/example.txt` ships and
the real lists must be supplied by the user as files in this format.

Preprocessing follows ADM/DiT: `center_crop_arr` (halve with a BOX filter while the short side is at least twice the
target, resize the short side to the target with BICUBIC, center crop), optional random horizontal flip, scale to
[-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
CLASSLIST_DIR = Path(__file__).with_name("classlists")


@dataclass(frozen=True)
class MergedClass:
    """One label of the dataset: a name and the image folders merged into it."""

    name: str
    folders: tuple[str, ...]


def read_class_list(path: str | Path) -> list[MergedClass]:
    """Parse a class-list file (format in the module docstring); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-list file {path} does not exist")
    classes: list[MergedClass] = []
    owner: dict[str, str] = {}
    for line_no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        tokens = raw.split("#", 1)[0].split()
        if not tokens:
            continue
        where = f"{path}:{line_no}"
        if len(tokens) < 2:
            raise ValueError(
                f"{where}: malformed class-list line {raw.strip()!r}; expected '<merged_name> <folder> ...'"
            )
        name, folders = tokens[0], tuple(tokens[1:])
        if any(c.name == name for c in classes):
            raise ValueError(f"{where}: merged class {name!r} is defined twice")
        for folder in folders:
            if folder in owner:
                raise ValueError(f"{where}: folder {folder!r} already belongs to merged class {owner[folder]!r}")
            owner[folder] = name
        classes.append(MergedClass(name, folders))
    if not classes:
        raise ValueError(f"class-list file {path} defines no classes")
    return classes


def resolve_class_list(name_or_path: str | Path) -> Path:
    """A path to a class-list file, or the name of one shipped in `bench/data/classlists/` (e.g. `example`)."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    bundled = CLASSLIST_DIR / f"{name_or_path}.txt"
    if bundled.is_file():
        return bundled
    shipped = sorted(p.stem for p in CLASSLIST_DIR.glob("*.txt"))
    raise FileNotFoundError(
        f"class list {str(name_or_path)!r} is neither a file nor a shipped list (shipped: {shipped}); "
        "the KIND 611/150/461 merged ImageNet lists are not public and must be provided as files"
    )


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop: BOX-halve while the short side >= 2 * size, BICUBIC to size, center crop; uint8 HWC."""
    # Halving with BOX first avoids aliasing that a single large BICUBIC downscale would leave.
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.array(image)  # a writable copy (torch warns on read-only arrays)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _list_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


class ImageFolderDataset(Dataset):
    """Images of the folders named in a class list, labelled by merged class.

    Args:
        root: directory holding one sub-folder per listed folder name.
        class_list: a class-list file path, the name of a shipped list, or parsed `MergedClass` entries.
        image_size: output resolution after `center_crop_arr`.
        random_flip: flip horizontally with probability 1/2 in `__getitem__` (uses torch's global RNG, which
            DataLoader seeds per worker).
        max_per_class: keep at most this many images per merged class (the first ones in sorted path order), for
            few-shot downstream tasks.
        extensions: accepted file suffixes, compared case-insensitively.

    Items are `(image, label)`: float32 CHW in [-1, 1] and an int.
    """

    def __init__(
        self,
        root: str | Path,
        class_list: str | Path | Sequence[MergedClass],
        *,
        image_size: int = 256,
        random_flip: bool = False,
        max_per_class: int | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image root {self.root} does not exist or is not a directory")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
        if isinstance(class_list, (str, Path)):
            class_list = read_class_list(resolve_class_list(class_list))
        self.merged_classes = list(class_list)
        self.class_names = [c.name for c in self.merged_classes]
        self.image_size = image_size
        self.random_flip = random_flip
        extensions = tuple(e.lower() for e in extensions)

        self.samples: list[tuple[Path, int]] = []
        for label, merged in enumerate(self.merged_classes):
            files: list[Path] = []
            for folder in merged.folders:
                folder_path = self.root / folder
                if not folder_path.is_dir():
                    raise FileNotFoundError(f"folder {folder_path} of class {merged.name!r} does not exist")
                files.extend(_list_images(folder_path, extensions))
            if not files:
                raise ValueError(
                    f"class {merged.name!r} has no images with suffix {list(extensions)} in {list(merged.folders)}"
                )
            self.samples.extend((f, label) for f in files[:max_per_class])
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.merged_classes)

    def __len__(self) -> int:
        return len(self.samples)

    def raw_uint8(self, idx: int) -> np.ndarray:
        """Image `idx` after `center_crop_arr`, unflipped, as uint8 HWC (for metric reference sets)."""
        path = self.samples[idx][0]
        try:
            with Image.open(path) as image:
                return center_crop_arr(image.convert("RGB"), self.image_size)
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        arr = self.raw_uint8(idx)
        if self.random_flip and torch.rand(()) < 0.5:
            arr = arr[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
        return image / 127.5 - 1.0, int(self.samples[idx][1])
