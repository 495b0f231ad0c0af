"""The bundled sample dataset (12 real aerial images of Dubai with masks; see its dataset.json)."""

from __future__ import annotations

from pathlib import Path


def sample_path() -> Path:
    """Folder of the bundled ``dubai-sample`` dataset, in the folder format."""
    return Path(__file__).resolve().parent / "dubai-sample"
