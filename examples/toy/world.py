"""The synthetic world: 32x32 coloured disks on grey, caption "a disk", and its true preference (the disk's
warmth, measured from pixels). A new data source draws from here; nothing here trains anything."""

import colorsys
import io

import numpy as np

CAPTION = "a disk"
RESOLUTION = 32
WARM_HUE = 30.0 / 360.0  # orange: the most preferred hue


def hue_warmth(hue):
    """The true preference of a hue in [0, 1): cos(hue - 30 deg), 1 for orange, -1 for cyan-blue."""
    return np.cos(2 * np.pi * (np.asarray(hue) - WARM_HUE))


def draw_disks(rng, n):
    """n images (n, 32, 32, 3) in [0, 1] of one antialiased disk on grey, and their hues."""
    yy, xx = np.mgrid[0:RESOLUTION, 0:RESOLUTION].astype(np.float32) + 0.5
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), np.float32)
    hues = rng.random(n)
    for i in range(n):
        sat, val = rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)
        colour = np.array(colorsys.hsv_to_rgb(hues[i], sat, val), np.float32)
        radius = rng.uniform(6.0, 11.0)
        cy, cx = rng.uniform(radius + 1, RESOLUTION - radius - 1, size=2)
        inside = np.clip(radius - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) + 0.5, 0.0, 1.0)[..., None]
        images[i] = 0.5 * (1 - inside) + colour * inside
    return images, hues


def measure_hue(images, chroma_threshold=0.25, min_pixels=6):
    """Hue of the mean colour of the coloured (non-grey) pixels of each image; NaN where there is no disk.

    ``images``: (n, H, W, 3) floats in [0, 1]. A pixel is coloured when max(RGB) - min(RGB) exceeds
    ``chroma_threshold`` (grey has 0, the world's disks at least 0.6).
    """
    images = np.asarray(images, np.float64)
    chroma = images.max(-1) - images.min(-1)
    hues = np.full(len(images), np.nan)
    for i, (image, c) in enumerate(zip(images, chroma)):
        mask = c > chroma_threshold
        if mask.sum() >= min_pixels:
            hues[i] = colorsys.rgb_to_hsv(*image[mask].mean(0))[0]
    return hues


def true_preference(images):
    """The true preference measured from pixels: warmth of the disk's hue; -1 (the worst) where there is no disk."""
    hues = measure_hue(images)
    return np.where(np.isnan(hues), -1.0, hue_warmth(np.nan_to_num(hues))), ~np.isnan(hues)


def hue_diversity(images, bins=12):
    """Normalised entropy of the hue histogram of the samples with a disk: 1 = all hues equally often, 0 = one hue."""
    hues = measure_hue(images)
    hues = hues[~np.isnan(hues)]
    if len(hues) == 0:
        return 0.0
    counts = np.histogram(hues, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    prob = counts[counts > 0] / counts.sum()
    return float(-(prob * np.log(prob)).sum() / np.log(bins))


def to_uint8(images):
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def encoded(image, fmt="JPEG"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format=fmt, quality=95)
    return buf.getvalue()

