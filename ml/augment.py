"""Training augmentation, a whole batch at a time, on uint8 NHWC tensors already at the input size.

The images reach this module through the serving path (:func:`ml.preprocess.to_uint8`: decode,
colour constancy if the recipe uses it, the one resize), so training sees what serving sees and
augmentation only adds variation on top:

- geometry: one affine warp per image (any-angle rotation, zoom into a random crop of 55-100% of
  the area, aspect jitter, translation, horizontal and vertical flips), reflection-padded so that
  no black corners teach the model a shortcut;
- colour: brightness, contrast, saturation and hue (dermatoscopes and lighting differ);
- a Gaussian blur (focus) and random erasing (hair, rulers, gel bubbles), each on some images.

``crops=False`` (the recipe's last epoch) keeps only flips and colour: the model ends on whole
images, as served. Everything draws from one ``torch.Generator``, so a seeded run is repeatable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ml.model import Preprocessing

#: at strength 1 a crop keeps 1 - CROP_SPAN of the area at least (55%); the span scales with the strength
CROP_SPAN = 0.45

# RGB <-> YIQ: hue is a rotation of the (I, Q) plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


class Augment:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H', W') channels-last, H' x W' = ``out_size``."""

    def __init__(
        self,
        prep: Preprocessing,
        generator: torch.Generator,
        *,
        out_size: tuple[int, int] | None = None,
        strength: float = 1.0,
        rotate: bool = True,
        blur: float = 0.2,
        erase: float = 0.25,
        hue: float = 0.05,
    ) -> None:
        self.size = out_size or prep.input_size
        self.mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(prep.std).view(1, 3, 1, 1)
        self.g = generator
        self.strength = strength
        self.rotate = rotate
        self.blur = blur
        self.erase = erase
        self.hue = hue

    def _uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.g)

    def _coin(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self.g) < p

    def geometry(self, x: torch.Tensor, crops: bool) -> torch.Tensor:
        n, _, h, w = x.shape
        flip_x = torch.where(self._coin(n, 0.5), -1.0, 1.0)
        flip_y = torch.where(self._coin(n, 0.5), -1.0, 1.0)
        if crops:
            area = self._uniform(n, 1.0 - CROP_SPAN * self.strength, 1.0)
            log_ratio = self._uniform(n, math.log(3 / 4), math.log(4 / 3)) * self.strength
            sx = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
            sy = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
            angle = self._uniform(n, -math.pi, math.pi) if self.rotate else torch.zeros(n)
            tx = (1 - sx) * self._uniform(n, -1.0, 1.0)
            ty = (1 - sy) * self._uniform(n, -1.0, 1.0)
        else:
            sx = sy = torch.ones(n)
            angle, tx, ty = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        # affine_grid works in normalised coordinates; the aspect factor keeps rotations rigid on
        # non-square images (a 90-degree turn of a 4:3 image shows its middle, not a squashed copy).
        aspect = w / h
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = cos * sx * flip_x
        theta[:, 0, 1] = -sin * sy / aspect * flip_y
        theta[:, 1, 0] = sin * sx * aspect * flip_x
        theta[:, 1, 1] = cos * sy * flip_y
        theta[:, 0, 2] = tx
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, [n, 3, *self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def colour(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        s = 0.2 * self.strength
        view = (n, 1, 1, 1)
        x = x * self._uniform(n, 1 - s, 1 + s).view(view)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * self._uniform(n, 1 - s, 1 + s).view(view) + mean
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * self._uniform(n, 1 - s, 1 + s).view(view) + gray
        if self.hue:
            turn = self._uniform(n, -self.hue, self.hue) * (2 * math.pi) * self.strength
            cos, sin = torch.cos(turn), torch.sin(turn)
            rot = torch.zeros(n, 3, 3)
            rot[:, 0, 0] = 1.0
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
            matrix = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ  # (n, 3, 3)
            x = torch.einsum("nij,njhw->nihw", matrix, x)
        return x

    def blur_some(self, x: torch.Tensor) -> torch.Tensor:
        chosen = self._coin(x.shape[0], self.blur * self.strength)
        if not chosen.any():
            return x
        sigma = float(self._uniform(1, 0.3, 1.2))
        radius = 2
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(taps**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        part = x[chosen]
        across = kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1)
        down = kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1)
        part = F.conv2d(F.pad(part, (radius, radius, 0, 0), mode="reflect"), across, groups=3)
        part = F.conv2d(F.pad(part, (0, 0, radius, radius), mode="reflect"), down, groups=3)
        x = x.clone()
        x[chosen] = part
        return x

    def erase_some(self, x: torch.Tensor) -> torch.Tensor:
        """Random erasing (Zhong et al. 2020): one rectangle of noise on some images."""
        n, _, h, w = x.shape
        chosen = torch.nonzero(self._coin(n, self.erase * self.strength)).flatten().tolist()
        for i in chosen:
            area = float(self._uniform(1, 0.02, 0.15)) * h * w
            ratio = math.exp(float(self._uniform(1, math.log(0.3), math.log(3.3))))
            eh = min(h - 1, max(1, round(math.sqrt(area * ratio))))
            ew = min(w - 1, max(1, round(math.sqrt(area / ratio))))
            top = int(torch.randint(0, h - eh + 1, (), generator=self.g))
            left = int(torch.randint(0, w - ew + 1, (), generator=self.g))
            x[i, :, top : top + eh, left : left + ew] = torch.rand((3, eh, ew), generator=self.g)
        return x

    def __call__(self, batch: torch.Tensor, *, crops: bool = True) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).float() / 255.0
        x = self.geometry(x, crops)
        x = self.colour(x).clamp(0.0, 1.0)
        if crops:
            x = self.blur_some(x)
            x = self.erase_some(x)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
