"""Official promptable-segmenter checkpoints: where they are, and a verified download.

SHA-256: lowlabel records a checkpoint's SHA-256 only where it was computed from the file
itself. These machines cannot download the files, so none is recorded yet (``None``);
``download`` then prints the hash it computed and says that it could not be checked.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Checkpoint:
    name: str
    backend: str
    model_type: str
    url: str
    sha256: str | None
    approx_mb: int


CHECKPOINTS = {
    c.name: c
    for c in (
        Checkpoint("sam_vit_h", "sam", "vit_h", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", None, 2450),
        Checkpoint("sam_vit_l", "sam", "vit_l", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth", None, 1190),
        Checkpoint("sam_vit_b", "sam", "vit_b", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", None, 358),
        Checkpoint("mobile_sam", "mobilesam", "vit_t", "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt", None, 39),
        Checkpoint("sam2.1_hiera_tiny", "sam2", "hiera_t", "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt", None, 149),
        Checkpoint("sam2.1_hiera_base_plus", "sam2", "hiera_b+", "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt", None, 309),
        Checkpoint("sam2.1_hiera_large", "sam2", "hiera_l", "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt", None, 856),
    )
}


def download(name: str, to: str | os.PathLike, timeout: float = 30.0) -> tuple[Path, str, bool]:
    """Download checkpoint ``name`` into folder ``to`` (atomically). Returns (path, computed
    sha256, whether it matched a recorded hash). Raises ConnectionError with a clear message
    when the machine cannot reach the URL, and ValueError on a hash mismatch."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {name!r}; see `lowlabel weights list`")
    ck = CHECKPOINTS[name]
    out_dir = Path(to)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / Path(ck.url).name
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(ck.url, timeout=timeout) as r, open(tmp, "wb") as f:
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                h.update(block)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        tmp.unlink(missing_ok=True)
        raise ConnectionError(
            f"cannot download {name} from {ck.url} ({err}). This machine has no access to it; download the file "
            f"elsewhere, copy it here, and pass its path (--checkpoint or LOWLABEL_SAM_CHECKPOINT)."
        ) from None
    digest = h.hexdigest()
    if ck.sha256 and digest != ck.sha256:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{name}: SHA-256 {digest} does not match the recorded {ck.sha256}; the file was not kept")
    os.replace(tmp, dest)
    return dest, digest, bool(ck.sha256)
