"""Image files decoded as the served pipeline decodes them, for every figure that stands for what it answers.

An upload reaches the model by one of two paths (``worker.pipeline._decode_claimed``):

- one at most :data:`ml.images.FIT_FACTOR` times the overlay's side on its longer side (HAM10000's
  600x450 originals, anything up to 1024 pixels) is decoded by the worker, a JPEG in draft mode down to
  that side, :data:`SERVED_SIDE` (``DERMQ_OVERLAY_MAX_SIDE``, whose default is
  :data:`ml.heatmap.DEFAULT_MAX_SIDE`: ml cannot read the worker's settings);
- a larger one is read from the working copy the intake made of it (:func:`ml.working_copy.decode_upload`),
  or, where it made none (a long thin strip), decoded by the worker as above.

Evaluation, the int8 choice, finalisation, int8 calibration and the drift reference decode through
:func:`decode_as_served`, so their figures are of the inputs serving gives the model. Draft-decoding
toward the model's own input side instead (224) decodes a 600x450 JPEG at half scale (300x225) where
the worker decodes it whole, and the model input then differs from the served one by several levels.
HAM10000's 200x150 development images decode the same either way.
"""

from __future__ import annotations

from ml import working_copy
from ml.heatmap import DEFAULT_MAX_SIDE
from ml.images import DEFAULT_LIMITS, FIT_FACTOR, DecodedImage, ImageLimits, decode

#: The side a served upload is decoded toward: the overlay's (``DERMQ_OVERLAY_MAX_SIDE``'s default).
SERVED_SIDE = DEFAULT_MAX_SIDE


def decode_as_served(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *, side: int = SERVED_SIDE) -> DecodedImage:
    """``data`` decoded as a worker serving with ``side`` as its overlay side would see it: its own draft
    decode, or the working copy the intake would have stored. Raises :class:`ml.images.InvalidImage`."""
    decoded = decode(data, limits, reduce_to=side)
    if max(decoded.width, decoded.height) <= FIT_FACTOR * side:  # no working copy for it (ml.images.working_size)
        return decoded
    copy = working_copy.decode_upload(data, limits, fit=side)[1]
    return decoded if copy is None else working_copy.read(copy)
