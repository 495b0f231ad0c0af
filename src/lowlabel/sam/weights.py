"""Official promptable-segmenter checkpoints: where they are, and a verified download.

SHA-256: these machines cannot download the files, so the hashes below were not computed
here. Each is the value that many independent public projects record for the file at that URL
after downloading it (found by code search on 2026-11-30; at least five agreeing sources each,
none disagreeing); the publishers themselves publish none. ``download`` refuses a file whose hash
differs and keeps nothing of it.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError


@dataclass(frozen=True)
class Checkpoint:
    name: str
    backend: str
    model_type: str
    url: str
    sha256: str
    approx_mb: int


CHECKPOINTS = {
    c.name: c
    for c in (
        Checkpoint("sam_vit_h", "sam", "vit_h", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2450),
        Checkpoint("sam_vit_l", "sam", "vit_l", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1190),
        Checkpoint("sam_vit_b", "sam", "vit_b", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 358),
        Checkpoint("mobile_sam", "mobilesam", "vit_t", "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt", "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", 39),
        Checkpoint("sam2.1_hiera_tiny", "sam2", "hiera_t", "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt", "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 149),
        Checkpoint("sam2.1_hiera_base_plus", "sam2", "hiera_b+", "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt", "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", 309),
        Checkpoint("sam2.1_hiera_large", "sam2", "hiera_l", "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt", "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 856),
    )
}


def download(name: str, to: str | os.PathLike, timeout: float = 30.0) -> tuple[Path, str]:
    """Download checkpoint ``name`` into folder ``to`` (atomically) and verify its SHA-256.
    Returns (path, sha256). Raises ConnectionError with a clear message when the machine cannot
    reach the URL, and CheckpointError on a hash mismatch (the file is not kept)."""
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
    if digest != ck.sha256:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(ck.url, f"SHA-256 {digest} does not match the recorded {ck.sha256}; the file was not kept")
    os.replace(tmp, dest)
    return dest, digest
