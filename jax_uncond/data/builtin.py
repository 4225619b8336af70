"""The built-in dataset: coloured shapes on plain backgrounds, drawn on demand, no download.

Image i is a pure function of i: a plain background and one large filled circle, square or triangle
in a contrasting colour, near the centre, at a jittered position and size. It is simple enough that a small UNet
learns it in a few CPU minutes at 32x32, and structured enough that a person tells a trained
model's samples (clean shapes on flat colour) from an untrained one's (noise) at a glance.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

NUM_IMAGES = 2048
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((20, 24, 60), (240, 236, 220), (30, 90, 60), (90, 30, 40))
"""Navy, cream, forest and wine: plain fields that every foreground colour stands out against."""
FOREGROUNDS = ((230, 60, 50), (250, 200, 40), (60, 140, 230), (160, 80, 210), (40, 190, 120))
"""Red, yellow, blue, purple and green."""
_SUPERSAMPLE = 4


class BuiltinShapes:
    """A random-access source of `NUM_IMAGES` RGB images of `size` x `size` pixels."""

    def __init__(self, size: int, num_images: int = NUM_IMAGES):
        self.size = size
        self.num_images = num_images

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Image.Image:
        if not 0 <= index < self.num_images:
            raise IndexError(f"built-in dataset index {index} out of range [0, {self.num_images})")
        return draw_shape(index, self.size)

    def describe(self, index: int) -> str:
        return f"built-in shapes image {index}"

    def fingerprint(self) -> str:
        return f"built-in shapes, {self.num_images} images drawn at {self.size}x{self.size}"


def draw_shape(index: int, size: int) -> Image.Image:
    """Image `index` of the built-in dataset, drawn at `size` (antialiased by supersampling)."""
    rng = np.random.default_rng([0x5EED, index])
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    foreground = FOREGROUNDS[int(rng.integers(len(FOREGROUNDS)))]
    shape = SHAPES[index % len(SHAPES)]
    canvas = size * _SUPERSAMPLE
    radius = canvas * rng.uniform(0.24, 0.34)
    cx, cy = canvas * rng.uniform(0.42, 0.58, size=2)  # near the centre: learnt early, seen at a glance
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=foreground)
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=foreground)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + 0.8 * radius), (cx + radius, cy + 0.8 * radius)],
                     fill=foreground)
    return image.resize((size, size), Image.BOX)
