"""Safetensors headers, read without torch: tensor names, shapes, dtypes and byte ranges.

Read directly (8-byte little-endian length + JSON) so that validating a config imports nothing heavy.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from merge.errors import EvomergeError


def read_safetensors_header(path: Path, with_data_start: bool = False):
    """Tensor names, shapes and dtypes from a safetensors header (8-byte length + JSON).

    Read directly so that validating a config never imports torch.
    """
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as e:
        raise EvomergeError(f"'{path}' is not a readable safetensors file ({e}); re-download "
                            f"or re-save it") from None
    header.pop("__metadata__", None)
    return (header, 8 + length) if with_data_start else header
