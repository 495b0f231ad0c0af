"""Pack what a lent GPU machine needs for the ACDC protocols into ``.gpu/`` (git-ignored; name it
in the device tool's ``carry``). The machine cannot reach ``../shared`` and takes at most 64 MiB a
call: acdc-scribbles' PNG slices (61 MB) plus the repository do not fit, so the images travel as
lossless WebP (55 MB, 10 % smaller; every image is decoded back and compared here) and ``unpack_acdc.py``
restores them there as PNG, pixel for pixel. Scribbles are left out (the protocols use masks).

    python benchmarks/device/pack_acdc.py     # ~18 min on 2 cores (WebP method 6: the smallest); writes .gpu/acdc.tar
"""
import io
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

SRC = sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/acdc-scribbles"


def encode(name: str) -> tuple[str, bytes]:
    im = Image.open(os.path.join(SRC, "images", name))
    buf = io.BytesIO()
    im.save(buf, format="WEBP", lossless=True, quality=100, method=6)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(im.mode))
    if not (back == np.asarray(im)).all():
        raise SystemExit(f"{name}: WebP round trip is not lossless")
    return name, buf.getvalue()


def main() -> None:
    os.makedirs(".gpu", exist_ok=True)
    names = sorted(os.listdir(os.path.join(SRC, "images")))
    with ProcessPoolExecutor(os.cpu_count()) as ex, tarfile.open(".gpu/acdc.tar", "w") as tar:
        for name, data in ex.map(encode, names, chunksize=32):
            info = tarfile.TarInfo(f"acdc-scribbles/images_webp/{name[:-4]}.webp")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for sub in ("masks", "splits", "dataset.json"):
            tar.add(os.path.join(SRC, sub), f"acdc-scribbles/{sub}")
    print(f"{len(names)} images -> .gpu/acdc.tar ({os.path.getsize('.gpu/acdc.tar') / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
