"""New sites that differ in acquisition, not only in classes: ``digits-shifted``.

Training is exactly ``digits-fewshot``'s (the same sites, clean images). An
evaluation episode is a new site: held-out digit classes, all of the site's
images (support and query) rendered through the site's own acquisition,
drawn once per episode and never seen in training:

* stroke width: thinner (grey erosion), unchanged or thicker (grey dilation),
* blur: a Gaussian point-spread of width ``blur`` pixels,
* contrast: ink scaled by ``contrast`` over a grey background ``background``,
* sensor noise: Gaussian, standard deviation ``noise``, then clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmeta.data.tasks.base import Episode, Split
from fedmeta.data.tasks.digits import DigitsFewShot

STROKES = (-1, 0, 1)  # thinner, as acquired, thicker


@dataclass(frozen=True)
class Acquisition:
    """One site's acquisition: how its images differ from the training sites'."""

    stroke: int = 0
    blur: float = 0.0
    contrast: float = 1.0
    background: float = 0.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.stroke not in STROKES:
            raise ValueError(f"stroke must be one of {STROKES}, got {self.stroke}")
        if self.blur < 0 or self.noise < 0 or not 0 < self.contrast <= 1:
            raise ValueError("blur and noise must be >= 0 and contrast in (0, 1]")
        if not 0 <= self.background < 1:
            raise ValueError(f"background must be in [0, 1), got {self.background}")


def draw_acquisition(rng: np.random.Generator) -> Acquisition:
    """A new site's acquisition, every factor drawn independently."""
    return Acquisition(
        stroke=int(rng.choice(STROKES)),
        blur=float(rng.uniform(0.0, 1.0)),
        contrast=float(rng.uniform(0.4, 1.0)),
        background=float(rng.uniform(0.0, 0.3)),
        noise=float(rng.uniform(0.02, 0.15)),
    )


def _neighbourhood(img: np.ndarray, reduce) -> np.ndarray:
    """3x3 max/min filter over the last two axes (edge-padded)."""
    h, w = img.shape[-2:]
    padded = np.pad(img, [(0, 0)] * (img.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    stack = [padded[..., i : i + h, j : j + w] for i in range(3) for j in range(3)]
    return reduce(np.stack(stack), axis=0)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    r = max(1, int(np.ceil(2 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = img.shape[-2:]
    pad = [(0, 0)] * (img.ndim - 2)
    rows = np.pad(img, pad + [(0, 0), (r, r)], mode="edge")
    img = sum(k[i] * rows[..., :, i : i + w] for i in range(2 * r + 1))
    cols = np.pad(img, pad + [(r, r), (0, 0)], mode="edge")
    return sum(k[i] * cols[..., i : i + h, :] for i in range(2 * r + 1))


def render(x: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Images ``x`` ([n, 1, H, W] in [0, 1]) as the site ``acq`` acquires them."""
    img = np.asarray(x, dtype=np.float32)
    if acq.stroke > 0:
        img = _neighbourhood(img, np.max) * 0.5 + img * 0.5  # half a pixel thicker
    elif acq.stroke < 0:
        img = _neighbourhood(img, np.min) * 0.5 + img * 0.5
    img = _blur(img, acq.blur)
    img = acq.background + acq.contrast * (1.0 - acq.background) * img
    if acq.noise > 0:
        img = img + rng.normal(0.0, acq.noise, size=img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


class ShiftedDigits(DigitsFewShot):
    """``digits-fewshot`` whose evaluation sites each have their own acquisition shift."""

    name = "digits-shifted"

    def eval_episode(
        self, split: Split, rng: np.random.Generator, shots: int, query: int
    ) -> Episode:
        ep = super().eval_episode(split, rng, shots, query)
        acq = draw_acquisition(rng)
        return Episode(
            render(ep.support_x, acq, rng), ep.support_y, render(ep.query_x, acq, rng), ep.query_y
        )
