"""Where training batches come from: decoded once into memory, or streamed by workers."""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor
from torchvision.transforms import functional as TF

from models.distributed import Ranks
from models.images import ImageError, load_image
from models.preprocess import Preprocess
from models.training.data import (
    augment,
    eval_geometry,
    holdout_split,
    input_norm,
    list_split,
    load_split,
    normalize,
)
from models.training.evaluation import evaluate_cached

__all__ = ["CachedData", "StreamData"]


class CachedData:
    """Every image decoded once into memory (uint8); batches cut from one seeded permutation."""

    def __init__(self, args: argparse.Namespace, ranks: Ranks) -> None:
        t0 = time.time()
        self.args, self.ranks = args, ranks
        quiet = not ranks.main
        self.train_x, self.train_y, self.classes, _ = load_split(
            args.data / "train", args.cache_size, "decode train", quiet
        )
        self.val_classes = list_split(args.data / "val")[1]
        if args.holdout > 0:
            # choices are made on images carved from train/; val/ is only scored at the end
            keep, held = holdout_split(self.train_y, args.holdout, args.holdout_seed)
            self.select_x, self.select_y = self.train_x[held], self.train_y[held]
            self.train_x, self.train_y = self.train_x[keep], self.train_y[keep]
            self.select_split = "holdout"
        else:
            self.select_x, self.select_y, _, _ = load_split(
                args.data / "val", args.cache_size, "decode val", quiet
            )
            self.select_split = "val"
        self.seconds = time.time() - t0

    @property
    def n_train(self) -> int:
        return len(self.train_x)

    @property
    def n_select(self) -> int:
        return len(self.select_x)

    def batches(self, epoch: int, gen: torch.Generator):
        """(uint8 images, labels) of this rank's share of each global batch of the epoch."""
        del epoch  # the generator carries the state from epoch to epoch (saved for --resume)
        args, ranks = self.args, self.ranks
        share = args.batch_size // ranks.world
        part = slice(ranks.rank * share, (ranks.rank + 1) * share)
        order = torch.randperm(self.n_train, generator=gen)
        for b in range(self.n_train // args.batch_size):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            images = augment(self.train_x[idx], args.img_size, args.min_scale, gen, part)
            yield images, self.train_y[idx][part]

    def evaluate(self, model, size: int) -> float:
        return evaluate_cached(
            model, self.select_x, self.select_y, size, self.args.bf16,
            crop_ratio=self.args.test_crop_ratio, norm=input_norm(self.args),
            channels_last=self.args.channels_last,
        )  # fmt: skip


class _Decoded(torch.utils.data.Dataset):
    """(path, label) samples decoded by the allow-listed loader, then `transform` (uint8 out)."""

    def __init__(self, samples: list[tuple[str, int]], transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        try:
            image = load_image(path)
        except ImageError:
            # a broken file in a large data set: a black image keeps the batch shapes; the
            # count is small and said by the decoding of the validation split as well
            return torch.zeros(3, *self.transform.size, dtype=torch.uint8), label
        return TF.pil_to_tensor(self.transform(image)), label


class _TrainCrop:
    """Random-resized crop and horizontal flip of a PIL image (torchvision's parameters)."""

    def __init__(self, size: int, min_scale: float) -> None:
        from torchvision import transforms

        self.size = (size, size)
        self.crop = transforms.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True)
        self.flip = transforms.RandomHorizontalFlip()

    def __call__(self, image):
        return self.flip(self.crop(image.convert("RGB")))


class _TestCrop:
    def __init__(self, size: int, crop_ratio: float) -> None:
        resize, crop = eval_geometry(size, crop_ratio)
        self.size = (crop, crop)
        self.preprocess = Preprocess(resize=resize, crop=crop)

    def __call__(self, image):
        return self.preprocess.crop_image(image)


class StreamData:
    """Images decoded and augmented per batch in worker processes, sharded by a sampler."""

    def __init__(self, args: argparse.Namespace, ranks: Ranks) -> None:
        self.args, self.ranks = args, ranks
        samples, self.classes = list_split(args.data / "train")
        self.val_classes = list_split(args.data / "val")[1]
        labels = torch.tensor([y for _, y in samples], dtype=torch.long)
        if args.holdout > 0:
            keep, held = holdout_split(labels, args.holdout, args.holdout_seed)
            self.train = [samples[i] for i in keep.tolist()]
            self.select = [samples[i] for i in held.tolist()]
            self.select_split = "holdout"
        else:
            self.train, self.select_split = samples, "val"
            self.select = list_split(args.data / "val")[0]
        self.seconds = 0.0

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_select(self) -> int:
        return len(self.select)

    def batches(self, epoch: int, gen: torch.Generator):
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        args, ranks = self.args, self.ranks
        dataset = _Decoded(self.train, _TrainCrop(args.img_size, args.min_scale))
        sampler = DistributedSampler(
            dataset, ranks.world, ranks.rank, shuffle=True, seed=args.seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        loader = DataLoader(
            dataset, batch_size=args.batch_size // ranks.world, sampler=sampler,
            num_workers=args.workers, drop_last=True, pin_memory=args.device == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        yield from loader

    def evaluate(self, model, size: int) -> float:
        from torch.utils.data import DataLoader

        dataset = _Decoded(self.select, _TestCrop(size, self.args.test_crop_ratio))
        loader = DataLoader(dataset, batch_size=100, num_workers=self.args.workers)
        device = next(model.parameters()).device
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in loader:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                    x = normalize(x, input_norm(self.args), self.args.channels_last)
                    pred = model(x.to(device)).argmax(1)
                correct += (pred.cpu() == y).sum().item()
        return 100.0 * correct / max(1, len(dataset))
