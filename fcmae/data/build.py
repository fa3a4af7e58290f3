"""From a `data` config section to per-process micro-batches for each epoch."""
from __future__ import annotations

import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from fcmae.data.device import normalisation, to_device
from fcmae.data.digits import Digits
from fcmae.data.folder import ImageFiles, imagefolder_samples, is_imagefolder, list_images
from fcmae.data.shard_stream import is_url
from fcmae.data.shards import ShardImages, count_samples, expand_shards, raise_read_errors
from fcmae.data.transforms import default_stats, eval_transform, train_transform
from fcmae.engine.distributed import DistInfo


def detect_format(path: str, fmt: str = "auto") -> str:
    """auto -> webdataset (.tar pattern or a folder of .tar), imagefolder (class subfolders only) or folder."""
    if fmt != "auto":
        return fmt
    if ".tar" in path or "{" in path or is_url(path):
        return "webdataset"
    if not os.path.isdir(path):
        raise ValueError(f"data.path {path!r} is neither a folder nor a .tar shard pattern")
    if any(e.endswith(".tar") for e in os.listdir(path)):
        return "webdataset"
    return "imagefolder" if is_imagefolder(path) else "folder"


class SkipSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, drop_last) that leaves out its first `skip` indices.

    The union over processes of the i-th micro-batches is the same set of samples for any number of processes
    (positions [i*b*W, (i+1)*b*W) of the epoch's permutation), so one process with the global batch and W
    processes with 1/W of it see the same data.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, skip: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ImageData:
    """Micro-batches (images (b, C, H, W) uint8, labels (b,), failures (b,)) of size b = micro_batch for this process;
    `to_device` turns the images into normalised floats on the device (`fcmae.data.device.to_device`)."""

    def __init__(self, cfg, in_chans: int, micro_batch: int, accum: int, info: DistInfo, seed: int):
        self.cfg, self.in_chans, self.micro_batch, self.info, self.seed = cfg, in_chans, micro_batch, info, seed
        self.format = detect_format(cfg.path, cfg.format)
        d_mean, d_std = default_stats(in_chans)
        self.mean, self.std = cfg.mean or d_mean, cfg.std or d_std
        self._device_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # `normalisation`, per device
        tf = train_transform(cfg.image_size, in_chans, cfg.min_scale, cfg.hflip, cfg.fast_decode)  # uint8
        self.eval_tf = eval_transform(cfg.image_size, in_chans, self.mean, self.std)
        global_micro = micro_batch * info.world_size
        if self.format == "webdataset":
            urls = expand_shards(cfg.path)
            readers = info.world_size * max(1, cfg.num_workers)
            if len(urls) < readers:  # split_by_node / split_by_worker would leave a reader without a shard
                raise ValueError(f"the {len(urls)} shards of {cfg.path!r} cannot feed {info.world_size} process(es) x "
                                 f"{max(1, cfg.num_workers)} loader worker(s), each of which reads whole shards of its "
                                 "own; lower data.num_workers or write more, smaller shards (fcmae shards --shard-size)")
            num = cfg.num_samples or count_samples(urls)
            if num is None:
                where = ("pipe: commands have no sizes.json to read" if urls[0].startswith("pipe:") else
                         "no sizes.json next to them lists them all, as `fcmae shards` writes")
                raise ValueError(f"cannot tell how many samples the shards {cfg.path!r} hold ({where}); set "
                                 "data.num_samples (the sum of the sizes.json values)")
            self.dataset = ShardImages(urls, tf, in_chans, micro_batch, seed, cfg.shuffle_buffer)
            self.num_samples = num
        else:
            if self.format == "digits":
                self.dataset = Digits(cfg.image_size, tf, in_chans, seed)
                if cfg.digits_holdout:  # never pretrain on the digits fine-tuning holds out (its data.digits_val)
                    from fcmae.data.labeled import digits_split, subset

                    held = set(digits_split(0, cfg.digits_holdout)[1])
                    self.dataset = subset(self.dataset, [i for i in range(len(self.dataset)) if i not in held])
            else:
                if not os.path.isdir(cfg.path):
                    raise ValueError(f"data.path {cfg.path!r} is not a folder")
                if self.format == "imagefolder":
                    files, labels, _ = imagefolder_samples(cfg.path)
                else:
                    files, labels = list_images(cfg.path), None
                self.dataset = ImageFiles(files, tf, in_chans, labels, seed)
            if cfg.num_samples is not None and cfg.num_samples < len(self.dataset):  # the first N (quick runs)
                from fcmae.data.labeled import subset

                self.dataset = subset(self.dataset, list(range(cfg.num_samples)))
            self.num_samples = len(self.dataset) // info.world_size * info.world_size
        self.steps_per_epoch = self.num_samples // (global_micro * accum)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.num_samples} images is less than one global batch ({global_micro * accum}); "
                             "lower data.batch_size or add images")

    def to_device(self, imgs: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
        """uint8 (b, C, H, W) batch -> normalised float32 on `device` (the constants are copied there once)."""
        if device not in self._device_stats:
            self._device_stats[device] = normalisation(self.mean, self.std, device)
        return to_device(imgs, device, *self._device_stats[device], channels_last)

    def check_readable(self) -> None:
        """ValueError when the data set holds no readable image at all."""
        if isinstance(self.dataset, ShardImages):
            self.dataset.first_images(1, self.eval_tf)
        else:
            self.dataset.check_readable()

    def batches(self, epoch: int, skip_micro: int) -> DataLoader:
        workers = self.cfg.num_workers
        common = dict(num_workers=workers, pin_memory=self.info.device.type == "cuda",
                      persistent_workers=False, prefetch_factor=4 if workers else None)
        if isinstance(self.dataset, ShardImages):
            self.dataset.set_epoch(epoch, skip_micro)
            return raise_read_errors(DataLoader(self.dataset, batch_size=None, **common))
        self.dataset.set_epoch(epoch)
        sampler = SkipSampler(self.dataset, self.info.world_size, self.info.rank, self.seed,
                              skip=skip_micro * self.micro_batch)
        sampler.set_epoch(epoch)
        return DataLoader(self.dataset, batch_size=self.micro_batch, sampler=sampler, drop_last=True, **common)

    def vis_images(self, n: int) -> torch.Tensor:
        """(n, C, H, W): a fixed set of images (evenly spread over a map-style set), center-cropped, normalised."""
        if isinstance(self.dataset, ShardImages):
            return torch.stack(self.dataset.first_images(n, self.eval_tf))
        idx = torch.linspace(0, len(self.dataset) - 1, min(n, len(self.dataset))).long().tolist()
        imgs = [self.dataset.load(i) for i in idx]
        return torch.stack([self.eval_tf(im) for im in imgs if im is not None])


def build_image_data(cfg, in_chans: int, micro_batch: int, accum: int, info: DistInfo, seed: int) -> ImageData:
    data = ImageData(cfg, in_chans, micro_batch, accum, info, seed)
    data.check_readable()
    return data
