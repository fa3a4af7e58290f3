"""The built-in demo set as a map-style dataset: scikit-learn's handwritten digits as PIL images."""
from __future__ import annotations

from PIL import Image

from fcmae.data.decode import convert_image
from fcmae.data.folder import ImageFiles
from fcmae.demo_data import load_digits


class Digits(ImageFiles):
    """The 1797 digits upscaled to `size` px (grey, converted to the wanted channels); labels 0..9."""

    def __init__(self, size: int, transform, in_chans: int, seed: int = 0):
        imgs, labels = load_digits(size, in_chans=1)
        self.images = [Image.fromarray((im[0] * 255).round().byte().numpy(), "L") for im in imgs]
        super().__init__([f"digit-{i}" for i in range(len(imgs))], transform, in_chans, labels.tolist(), seed)

    def load(self, i: int, warn: bool = True):
        return convert_image(self.images[i], self.in_chans)

    def source(self, i: int):
        return self.images[i]
