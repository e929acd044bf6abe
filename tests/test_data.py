"""Embedded synthetic dataset, ImageFolder loader with class-list files, and PNG grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data.grid import make_grid, save_grid
from bench.data.imagefolder import (
    ImageFolderDataset,
    MergedClass,
    center_crop_arr,
    read_class_list,
    resolve_class_list,
)
from bench.data.synthetic import (
    HUES,
    NUM_SYNTHETIC_CLASSES,
    SHAPES,
    SYNTHETIC_DOMAINS,
    TEXTURES,
    SyntheticImages,
    class_attributes,
    render_images,
    synthetic_split,
)

# --------------------------------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_differs():
    a = SyntheticImages([0, 9, 40], per_class=3, seed=7)
    b = SyntheticImages([0, 9, 40], per_class=3, seed=7)
    c = SyntheticImages([0, 9, 40], per_class=3, seed=8)
    assert a.images_uint8().tobytes() == b.images_uint8().tobytes()
    assert not np.array_equal(a.images_uint8(), c.images_uint8())
    # every image differs from the other seed's, not just some
    assert all(not np.array_equal(x, y) for x, y in zip(a.images_uint8(), c.images_uint8()))


def test_image_is_a_function_of_seed_domain_class_and_index_only():
    big = SyntheticImages([3, 5, 11], per_class=5, seed=2)
    small = SyntheticImages([5], per_class=2, seed=2, first_index=3)
    np.testing.assert_array_equal(small.raw_uint8(0), big.raw_uint8(5 + 3))  # class 5, image 3
    np.testing.assert_array_equal(small.raw_uint8(1), big.raw_uint8(5 + 4))
    shuffled = render_images([11, 3, 5], [1, 4, 0], seed=2)
    np.testing.assert_array_equal(shuffled[0], big.raw_uint8(10 + 1))
    np.testing.assert_array_equal(shuffled[1], big.raw_uint8(0 + 4))
    np.testing.assert_array_equal(shuffled[2], big.raw_uint8(5 + 0))
    # images within a class are all different (jitter), and the same (class, index) differs across domains
    assert len({img.tobytes() for img in big.images_uint8()}) == len(big)
    sketch = render_images([5], [3], seed=2, domain="sketch")
    assert not np.array_equal(sketch[0], small.raw_uint8(0))


@pytest.mark.parametrize("size", [16, 32, 64])
def test_items_have_documented_shape_dtype_range_and_labels(size):
    ds = SyntheticImages([17, 2, 60], image_size=size, per_class=4)
    assert len(ds) == 12 and ds.num_classes == 3
    image, label = ds[5]
    assert image.dtype == torch.float32 and image.shape == (3, size, size)
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert image.max() - image.min() > 0.5  # not a blank image
    assert label == 1  # class-major order, relabelled to the position in `classes`
    assert [ds[i][1] for i in range(len(ds))] == [0] * 4 + [1] * 4 + [2] * 4
    raw = ds.images_uint8()
    assert raw.dtype == np.uint8 and raw.shape == (12, size, size, 3)
    torch.testing.assert_close(image, torch.from_numpy(raw[5]).permute(2, 0, 1).float() / 127.5 - 1.0)
    assert ds.class_names == ["solid-cyan-square", "solid-red-triangle", "striped-violet-cross"]


def test_class_grid_covers_every_attribute_combination():
    combos = {class_attributes(c) for c in range(NUM_SYNTHETIC_CLASSES)}
    assert NUM_SYNTHETIC_CLASSES >= 48
    assert combos == {(s, h, t) for s in SHAPES for h in HUES for t in TEXTURES}


def test_splits_are_disjoint_and_novel_classes_recombine_seen_attributes():
    pretrain, novel, every = synthetic_split("pretrain"), synthetic_split("novel"), synthetic_split("all")
    assert not set(pretrain) & set(novel)
    assert sorted(pretrain + novel) == every == list(range(NUM_SYNTHETIC_CLASSES))
    assert len(novel) >= 8 and len(pretrain) > len(novel)
    for position in range(3):  # shape, hue, texture: each seen in pre-training, only the combination is new
        seen = {class_attributes(c)[position] for c in pretrain}
        assert {class_attributes(c)[position] for c in novel} <= seen
    a, b = synthetic_split("novel-a"), synthetic_split("novel-b")
    assert not set(a) & set(b) and sorted(a + b) == novel
    with pytest.raises(ValueError, match="unknown synthetic split 'nope'"):
        synthetic_split("nope")


def _translation_invariant_features(images: np.ndarray) -> np.ndarray:
    # |FFT| ignores where the object sits, so nearest-class-mean measures shape, colour and texture, not placement.
    x = images.astype(np.float32) / 255.0
    x = x - x.mean(axis=(1, 2), keepdims=True)
    spectrum = np.fft.fftshift(np.abs(np.fft.fft2(x, axes=(1, 2))), axes=(1, 2))
    centre = images.shape[1] // 2
    low = spectrum[:, centre - 8 : centre + 8, centre - 8 : centre + 8]
    return np.log1p(low).reshape(len(images), -1)


@pytest.mark.parametrize("domain", SYNTHETIC_DOMAINS)
def test_classes_are_distinguishable_on_held_out_images(domain):
    classes = synthetic_split("all")
    train = SyntheticImages(classes, per_class=16, domain=domain)
    held_out = SyntheticImages(classes, per_class=4, first_index=16, domain=domain)
    f_train = _translation_invariant_features(train.images_uint8())
    f_test = _translation_invariant_features(held_out.images_uint8())
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
    means = np.stack([f_train[train.labels == k].mean(0) for k in range(len(classes))])
    predicted = ((f_test[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    accuracy = (predicted == held_out.labels).mean()
    assert accuracy > 12 / len(classes), f"{domain}: nearest-class-mean accuracy {accuracy:.3f}"  # chance 1/64


def test_domains_have_different_statistics():
    stats = {}
    for domain in SYNTHETIC_DOMAINS:
        images = SyntheticImages(synthetic_split("all"), per_class=2, domain=domain).images_uint8().astype(np.float64)
        channel_spread = np.abs(images - images.mean(-1, keepdims=True)).mean()  # 0 for greyscale
        stats[domain] = (images.mean(), images.std(), channel_spread)
    assert stats["xray"][2] == 0.0 and stats["natural"][2] > 5.0 and stats["sketch"][2] > 2.0
    assert stats["sketch"][0] < stats["natural"][0] - 30  # dark paper
    assert stats["xray"][0] < stats["natural"][0] - 30  # dark film
    for x, y in [("natural", "sketch"), ("natural", "xray"), ("sketch", "xray")]:
        assert np.abs(np.subtract(stats[x], stats[y])).max() > 5.0, (x, y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": [0, NUM_SYNTHETIC_CLASSES]}, "out of range"),
        ({"classes": [1, 1]}, "duplicates"),
        ({"classes": []}, "must not be empty"),
        ({"per_class": 0}, "per_class"),
        ({"domain": "underwater"}, "unknown synthetic domain 'underwater'"),
        ({"image_size": 4}, "image_size"),
    ],
)
def test_bad_synthetic_arguments_are_rejected(kwargs, message):
    kwargs = {"classes": [0], **kwargs}
    with pytest.raises(ValueError, match=message):
        SyntheticImages(kwargs.pop("classes"), **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------------------------


def test_save_grid_places_images_row_major(tmp_path):
    images = np.zeros((5, 4, 4, 3), dtype=np.uint8)
    for k in range(5):
        images[k] = 10 * (k + 1)
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=3, padding=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 6, 0] == 20 and grid[1, 11, 0] == 30
    assert grid[6, 1, 0] == 40 and grid[6, 6, 0] == 50
    assert grid[6, 11, 0] == 0 and grid[0, 0, 0] == 0  # empty cell and padding
    big = np.asarray(Image.open(save_grid(images, tmp_path / "x2.png", nrow=3, padding=1, upscale=2)))
    assert big.shape == (22, 32, 3)
    with pytest.raises(ValueError, match="uint8 NHWC"):
        make_grid(images.astype(np.float32))


# --------------------------------------------------------------------------------------------------------------------
# ImageFolder + class lists
# --------------------------------------------------------------------------------------------------------------------


def _write_image(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "train"
    for k in range(3):
        _write_image(root / "n001" / f"img{k}.png", (40, 30), (200, 10 * k, 0))
    _write_image(root / "n002" / "a.jpg", (30, 40), (0, 200, 0))
    _write_image(root / "n002" / "b.JPEG", (50, 50), (0, 100, 0))
    _write_image(root / "n003" / "c.PNG", (16, 16), (0, 0, 250))
    (root / "n003" / "notes.txt").write_text("not an image")
    class_list = tmp_path / "classes.txt"
    class_list.write_text("# merged classes\nred_and_green n001 n002  # two folders\n\nblue n003\n")
    return root, class_list


def test_imagefolder_merges_folders_into_labels(image_root):
    root, class_list = image_root
    ds = ImageFolderDataset(root, class_list, image_size=16)
    assert ds.class_names == ["red_and_green", "blue"] and ds.num_classes == 2
    assert len(ds) == 6  # the .txt file is not an image; .JPEG and .PNG count
    assert ds.labels.tolist() == [0, 0, 0, 0, 0, 1]
    image, label = ds[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1
    torch.testing.assert_close(image[2], torch.full((16, 16), 250 / 127.5 - 1.0))
    assert ds.raw_uint8(0).shape == (16, 16, 3) and ds.raw_uint8(0).dtype == np.uint8
    assert len(ImageFolderDataset(root, class_list, image_size=16, max_per_class=2)) == 3


def test_imagefolder_random_flip_mirrors_the_image(tmp_path):
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, :4] = 255  # left half white
    (tmp_path / "r" / "f").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "r" / "f" / "x.png")
    ds = ImageFolderDataset(tmp_path / "r", [MergedClass("x", ("f",))], image_size=8, random_flip=True)
    torch.manual_seed(0)
    seen = {bool(ds[0][0][0, 0, 0] > 0) for _ in range(20)}
    assert seen == {True, False}  # both orientations occur
    plain = ImageFolderDataset(tmp_path / "r", [MergedClass("x", ("f",))], image_size=8)
    assert all(plain[0][0][0, 0, 0] > 0 for _ in range(5))


def test_center_crop_matches_adm_rule():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    # a 2x nearest-upsampled copy: one BOX halving restores the original exactly, then nothing else changes
    doubled = Image.fromarray(np.repeat(np.repeat(small, 2, 0), 2, 1))
    np.testing.assert_array_equal(center_crop_arr(doubled, 16), small)
    # a wide image: short side resized to the target, long side centre-cropped
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 24:36] = 255  # white middle fifth
    out = center_crop_arr(Image.fromarray(wide), 10)
    assert out.shape == (10, 10, 3)
    assert out[:, 2:8].min() > 200 and out[:, 0].max() < 60  # crop centred on the white band


def test_class_list_errors_name_the_problem(tmp_path, image_root):
    root, class_list = image_root
    bad = tmp_path / "bad.txt"
    bad.write_text("ok n001\nlonely\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: malformed class-list line 'lonely'"):
        read_class_list(bad)
    bad.write_text("a n001\nb n001\n")
    with pytest.raises(ValueError, match="folder 'n001' already belongs to merged class 'a'"):
        read_class_list(bad)
    bad.write_text("a n001\na n002\n")
    with pytest.raises(ValueError, match="merged class 'a' is defined twice"):
        read_class_list(bad)
    bad.write_text("# nothing\n")
    with pytest.raises(ValueError, match="defines no classes"):
        read_class_list(bad)
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        ImageFolderDataset(tmp_path / "nonexistent", class_list)
    with pytest.raises(FileNotFoundError, match=r"n999 of class 'ghost' does not exist"):
        ImageFolderDataset(root, [MergedClass("ghost", ("n999",))])
    (root / "n004").mkdir()
    with pytest.raises(ValueError, match="class 'empty' has no images"):
        ImageFolderDataset(root, [MergedClass("empty", ("n004",))])
    with pytest.raises(FileNotFoundError, match="must be provided"):
        resolve_class_list("imagenet611_pretrain150")


def test_shipped_example_class_list_parses():
    classes = read_class_list(resolve_class_list("example"))
    assert [c.name for c in classes] == ["shark", "toy_dog", "tench", "goldfish"]
    assert classes[0].folders == ("n01484850", "n01491361", "n01494475")


def test_class_balanced_subset_keeps_every_class_evenly_and_deterministically():
    from bench.config.schema import DataConfig, ModelConfig
    from bench.data.factory import build_dataset
    from bench.data.subset import balanced_subset_indices

    labels = np.repeat(np.arange(4), [10, 10, 3, 1])
    kept = balanced_subset_indices(labels, 0.2)
    assert list(kept) == [0, 9, 10, 19, 20, 23]  # 2, 2, 1, 1 per class: first and last of each run, at least one
    assert list(balanced_subset_indices(labels, 1.0)) == list(range(24))
    with pytest.raises(ValueError, match="fraction"):
        balanced_subset_indices(labels, 0.0)
    data = DataConfig(split="novel-a", per_class=10, image_size=8, subset_fraction=0.25)
    subset = build_dataset(data, ModelConfig(in_channels=3, input_size=8))
    full = build_dataset(DataConfig(split="novel-a", per_class=10, image_size=8),
                         ModelConfig(in_channels=3, input_size=8))
    assert len(subset) == 3 * full.num_classes and subset.num_classes == full.num_classes
    assert np.bincount(subset.labels).tolist() == [3] * full.num_classes
    image, label = subset[1]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(full[int(subset.indices[1])][0]))
    assert label == subset.labels[1]


def test_the_label_space_names_the_classes_not_the_domain_or_the_subset():
    """FINE keeps an ancestry's class table when the label spaces agree (``bench.data.identity.label_space``)."""
    from bench.config.schema import DataConfig
    from bench.data.identity import label_space

    pretrain = label_space(DataConfig(split="pretrain"))
    assert len(pretrain) == 64
    assert label_space(DataConfig(split="pretrain", subset_fraction=0.25, per_class=8)) == pretrain
    assert label_space(DataConfig(split="novel-a", domain="sketch")) == label_space(DataConfig(split="novel-a"))
    assert label_space(DataConfig(split="novel-a")) != pretrain
    assert label_space(DataConfig(source="latents", latent_dir="/nonexistent/cache")) == ""  # unknown, not a guess
