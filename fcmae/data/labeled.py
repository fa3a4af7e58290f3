"""Labeled train/val splits for fine-tuning: an ImageFolder pair (train/ and val/) or the built-in digits, with
timm's train transform (RandomResizedCrop, flip, RandAugment, random erasing) and eval transform (resize to
size / crop_pct, center crop), for any number of input channels (images are decoded as pretraining decodes them)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from timm.data import create_transform

from fcmae.data.crop_decode import CropDecodeThen
from fcmae.data.decode import PIL_MODES
from fcmae.data.digits import Digits
from fcmae.data.folder import ImageFiles, imagefolder_samples, is_imagefolder
from fcmae.data.transforms import RepeatChannels, default_stats

DIGIT_CLASSES = [str(i) for i in range(10)]


class PythonSeeded:
    """Runs a transform with Python's and NumPy's RNGs seeded from torch's (timm's RandAugment and Mixup draw from
    them), restoring them afterwards: under `transforms.seeded_call` the whole augmentation of a sample is then a
    function of (seed, epoch, index)."""

    def __init__(self, transform):
        self.transform = transform

    @property
    def decodes(self) -> bool:
        return getattr(self.transform, "decodes", False)

    def __call__(self, img, **kwargs):
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        with python_seeded(seed):
            return self.transform(img, **kwargs)

    def __repr__(self) -> str:
        return f"PythonSeeded({self.transform!r})"


class python_seeded:
    """Context manager: `random` and `np.random` seeded with `seed` inside, their states restored on exit."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.states = random.getstate(), np.random.get_state()
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

    def __exit__(self, *exc):
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])


def grey_stats(mean: list[float], std: list[float], in_chans: int) -> tuple[list[float], list[float]]:
    """The stats timm's transform gets: one value for channel counts without a PIL mode (2, 5, ...), whose images are
    decoded grey (`decode.target_mode`), transformed as one channel and repeated (`with_channels`)."""
    if in_chans in PIL_MODES:
        return mean, std
    if len(set(mean)) > 1 or len(set(std)) > 1:
        raise ValueError(f"with model.in_chans={in_chans} every channel is the same grey image, so data.mean and "
                         "data.std need one value repeated (or leave them unset)")
    return mean[:1], std[:1]


def with_channels(transform, in_chans: int):
    """Append the (1, H, W) -> (in_chans, H, W) repeat for channel counts without a PIL mode."""
    return transform if in_chans in PIL_MODES else type(transform)([*transform.transforms, RepeatChannels(in_chans)])


def train_transform(cfg, mean, std, in_chans: int = 3):
    """timm's train transform; its RandomResizedCrop runs from the encoded image (`CropDecodeThen`: JPEGs decoded at
    reduced scale when data.fast_decode), the rest (flip, RandAugment, normalise, erasing) on the CPU as timm has it:
    random erasing's 'pixel' mode works on normalised values, so these batches stay float."""
    if in_chans == 4 and cfg.auto_augment:
        raise ValueError("timm's RandAugment cannot transform 4-channel (RGBA) images; set data.auto_augment=null")
    mean, std = grey_stats(mean, std, in_chans)
    tf = with_channels(create_transform(
        cfg.image_size, is_training=True, scale=(cfg.min_scale, 1.0), hflip=cfg.hflip, auto_augment=cfg.auto_augment,
        interpolation="bicubic", re_prob=cfg.reprob, re_mode="pixel", re_count=1, mean=mean, std=std), in_chans)
    crop, *rest = tf.transforms
    return PythonSeeded(CropDecodeThen(crop, type(tf)(rest), in_chans, fast=cfg.fast_decode))


def eval_transform(image_size: int, crop_pct: float, mean, std, in_chans: int = 3):
    mean, std = grey_stats(mean, std, in_chans)
    return with_channels(create_transform(image_size, is_training=False, crop_pct=crop_pct, interpolation="bicubic",
                                          mean=mean, std=std), in_chans)


def normalization(cfg, in_chans: int) -> tuple[list[float], list[float]]:
    """(mean, std) of a `data` section for `in_chans` channels: its own, else ImageNet's (grey for in_chans != 3).
    ValueError, before any data is read, when the counts disagree."""
    d_mean, d_std = default_stats(in_chans)
    mean, std = cfg.mean or d_mean, cfg.std or d_std
    for key, stats in (("data.mean", mean), ("data.std", std)):
        if len(stats) != in_chans:
            raise ValueError(f"{key} has {len(stats)} values but the model takes {in_chans} input channels; give "
                             f"{in_chans} values or leave it unset")
    return mean, std


@dataclass
class Splits:
    train: ImageFiles
    val: ImageFiles
    classes: list[str]
    format: str
    where: str


def folder_pair(cfg) -> tuple[str, str]:
    """(train root, val root) from data.train_path/val_path or data.path/{train,val}."""
    if cfg.train_path or cfg.val_path:
        if not (cfg.train_path and cfg.val_path):
            raise ValueError("set both data.train_path and data.val_path (or data.path with train/ and val/)")
        train, val = cfg.train_path, cfg.val_path
    else:
        train, val = os.path.join(cfg.path, "train"), os.path.join(cfg.path, "val")
    for key, root in (("train", train), ("val", val)):
        if not os.path.isdir(root) or not is_imagefolder(root):
            raise ValueError(f"the {key} split {root!r} is not an ImageFolder (a folder of class subfolders); give "
                             "data.path with train/ and val/ subfolders, or data.train_path and data.val_path")
    return train, val


def val_samples(root: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """Val files labelled with the TRAIN split's class indices; ValueError for classes the train split lacks."""
    files, labels, val_classes = imagefolder_samples(root)
    extra = sorted(set(val_classes) - set(classes))
    if extra:
        raise ValueError(f"the val split {root!r} has classes the train split lacks: {', '.join(extra[:10])}"
                         f"{' ...' if len(extra) > 10 else ''}; every val class needs a train folder of the same name")
    index = {c: i for i, c in enumerate(classes)}
    return files, [index[val_classes[label]] for label in labels]


def digits_split(per_class: int, num_val: int) -> tuple[list[int], list[int]]:
    """(labeled train indices, val indices) of the 1797 digits: a fixed permutation (independent of the run seed);
    val = its first num_val, train = the first `per_class` of each class among the rest."""
    from fcmae.demo_data import load_digits

    labels = load_digits(8, in_chans=1)[1].tolist()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).tolist()
    val, train, count = perm[:num_val], [], [0] * 10
    for i in perm[num_val:]:
        if count[labels[i]] < per_class:
            train.append(i)
            count[labels[i]] += 1
    return sorted(train), sorted(val)


def subset(ds: ImageFiles, idx: list[int]) -> ImageFiles:
    ds.files = [ds.files[i] for i in idx]
    ds.labels = [ds.labels[i] for i in idx]
    if hasattr(ds, "images"):
        ds.images = [ds.images[i] for i in idx]
    return ds


def build_splits(cfg, seed: int, train: bool = True, in_chans: int = 3) -> Splits:
    """The labeled splits of a `data` section (FinetuneDataConfig) as `in_chans`-channel images; train=False builds
    only what eval needs."""
    mean, std = normalization(cfg, in_chans)
    train_tf = train_transform(cfg, mean, std, in_chans) if train else None
    eval_tf = eval_transform(cfg.image_size, cfg.crop_pct, mean, std, in_chans)
    fmt = "digits" if cfg.format == "digits" else "imagefolder"
    if fmt == "digits":
        tr, va = digits_split(cfg.digits_per_class, cfg.digits_val)
        return Splits(subset(Digits(cfg.image_size, train_tf, in_chans, seed), tr),
                      subset(Digits(cfg.image_size, eval_tf, in_chans), va),
                      list(DIGIT_CLASSES), fmt, f"digits ({cfg.digits_per_class}/class labeled, {len(va)} val)")
    train_root, val_root = folder_pair(cfg)
    files, labels, classes = imagefolder_samples(train_root)
    vfiles, vlabels = val_samples(val_root, classes)
    if len(classes) < 2:  # one class: every prediction is right, a top-1 of 100 that means nothing
        raise ValueError(f"the train split {train_root!r} has {len(classes)} class folder ({', '.join(classes)}); "
                         "classifying needs at least 2 classes (one subfolder of images per class)")
    for root, f in ((train_root, files), (val_root, vfiles)):
        if not f:
            raise ValueError(f"no image files under {root!r}")
    splits = Splits(ImageFiles(files, train_tf, in_chans, labels, seed), ImageFiles(vfiles, eval_tf, in_chans, vlabels),
                    classes, fmt, f"{train_root} | {val_root}")
    for root, ds in ((train_root, splits.train), (val_root, splits.val)):
        try:
            ds.check_readable()  # stops at the first image that decodes
        except ValueError as e:
            raise ValueError(f"{root!r}: {e}") from None
    return splits
