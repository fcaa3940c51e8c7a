"""An RGB Pillow image's pixels as a NumPy array over Pillow's own memory: no copy.

Pillow keeps an RGB image as four bytes a pixel (red, green, blue and a pad byte), each row after
the other where the image fits one block of its memory (16 MB, about four megapixels), and exports
that memory through the Arrow C data interface (``Image.__arrow_c_array__``, Pillow 11.2 and later:
a fixed-size list of four ``uint8`` per pixel). :func:`rgbx` reads the buffer's address from the
exported structures, whose layout the Arrow specification fixes, and wraps it in an (H, W, 4)
array; the array holds the export, and the export holds the image's memory, so the pixels stay valid
for as long as the array (or anything made from it without copying) is referenced, whatever happens
to the image object.

The export is read only from Pillow 13 on: Pillow 11.2 to 12 export images whose rows are padded
(``PILLOW_ALIGNMENT``) as if they were not, which would shear the pixels silently, and crash on an
image made by ``Image.fromarrow``; Pillow 13 refuses padded rows with a ``ValueError``. An image
over borrowed memory (``readonly``: ``Image.frombuffer``, ``Image.fromarrow``) is never read in
place, on any version: its memory is another object's, which Pillow 13 exports but this module does
not rely on. Elsewhere (an older Pillow, an image in several blocks, whose rows are not contiguous, an
export not as described above) the pixels are copied as before (``tobytes("raw", "RGBX")``): the same
bytes. The copy took 0.13-0.22 ms for a 300x225 image on the worker's path, the export about 1 us
(docs/PERFORMANCE.md, forty-first session).

https://arrow.apache.org/docs/format/CDataInterface.html
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import PIL
from PIL import Image

#: whether this Pillow's export is read at all (see above)
EXPORTS = int(PIL.__version__.split(".")[0]) >= 13


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p),
    ("name", ctypes.c_char_p),
    ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]

#: PyCapsule_GetPointer, through a prototype of its own (setting ``argtypes`` on
#: ``ctypes.pythonapi``'s shared function object would change it for every other user in the process)
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def rgbx(image: Image.Image) -> np.ndarray:
    """(H, W, 4) uint8 pixels of the RGB ``image``: red, green, blue and Pillow's pad byte; a view of
    the image's memory where Pillow exports it as described above, else a copy. Treat it as read-only."""
    if image.mode != "RGB":
        raise ValueError(f"rgbx reads RGB images, not {image.mode}")
    image.load()  # a lazily opened image's size may change as it loads (nothing to do once loaded)
    width, height = image.size
    view = _exported(image, width, height) if EXPORTS and width and height and not image.readonly else None
    if view is None:
        return np.frombuffer(bytearray(image.tobytes("raw", "RGBX")), dtype=np.uint8).reshape(height, width, 4)
    return view


class _Pixels:
    """The NumPy array interface of exported pixel memory, holding the export (and so the memory)."""

    __slots__ = ("__array_interface__", "export")

    def __init__(self, address: int, shape: tuple[int, int, int], export: Any) -> None:
        self.__array_interface__ = {"data": (address, False), "shape": shape, "typestr": "|u1", "version": 3}
        self.export = export


#: whether Pillow's export of an RGB image has the schema described above: read once, from the
#: first export (the schema depends on the mode alone)
_schema_checked: list[bool] = []


def _exported(image: Image.Image, width: int, height: int) -> np.ndarray | None:
    export = getattr(image, "__arrow_c_array__", None)
    if export is None:
        return None
    try:
        capsules: Any = export()
    except ValueError:  # rows that are not contiguous: an image in several blocks, or padded rows
        return None
    if not _schema_checked:
        schema = _ArrowSchema.from_address(_capsule_pointer(capsules[0], b"arrow_schema"))
        children = schema.children
        _schema_checked.append(
            schema.format == b"+w:4" and schema.n_children == 1 and children[0].contents.format == b"C"
        )
    if not _schema_checked[0]:
        return None
    array = _ArrowArray.from_address(_capsule_pointer(capsules[1], b"arrow_array"))
    pixels = width * height
    if (array.length, array.offset, array.n_children) != (pixels, 0, 1):
        return None
    child = array.children[0].contents
    address = child.buffers[1] if (child.length, child.offset, child.n_buffers) == (4 * pixels, 0, 2) else None
    if not address:
        return None
    return np.asarray(_Pixels(address, (height, width, 4), capsules))
