"""pixgen's one I/O layer: images, atomic writes, the synthetic-set manifest and slides.

- :mod:`pixgen.io.images`: ``load_image`` / ``load_rgb`` (the one reader: RGB uint8, 16-bit
  scaled, alpha on white, clear errors), ``IMAGE_SUFFIXES``, ``list_images``, ``save_png`` with
  provenance, ``contact_sheet``.
- :mod:`pixgen.io.atomic`: ``atomic_write`` (every file pixgen writes), ``atomic_dir``,
  ``write_json_atomic`` / ``write_text_atomic`` / ``write_bytes_atomic``.
- :mod:`pixgen.io.manifest`: ``SetManifest`` (``manifest.json`` of a synthetic set) and
  ``SetWriter``.
- :mod:`pixgen.io.slides`: whole-slide images (``open_slide``, ``region_at_mpp``); imported on
  demand, not here.

Example:
    >>> from pixgen.io import load_rgb, write_json_atomic, SetManifest   # doctest: +SKIP
"""

from pixgen.io.atomic import atomic_dir, atomic_write, write_bytes_atomic, write_json_atomic, write_text_atomic
from pixgen.io.images import (
    IMAGE_SUFFIXES,
    READ_ERRORS,
    contact_sheet,
    list_images,
    load_image,
    load_rgb,
    read_provenance,
    save_png,
    to_rgb,
)
from pixgen.io.manifest import (
    MANIFEST_FILE,
    Condition,
    ImageEntry,
    ModelId,
    SamplerSettings,
    SetManifest,
    SetWriter,
    check_output_folder,
    sha256_file,
    weights_sha256,
)

__all__ = [
    "IMAGE_SUFFIXES", "READ_ERRORS", "list_images", "load_image", "load_rgb", "to_rgb", "save_png",
    "read_provenance", "contact_sheet",
    "atomic_write", "atomic_dir", "write_json_atomic", "write_text_atomic", "write_bytes_atomic",
    "MANIFEST_FILE", "SetManifest", "SetWriter", "Condition", "ImageEntry", "ModelId", "SamplerSettings",
    "check_output_folder", "sha256_file", "weights_sha256",
]
