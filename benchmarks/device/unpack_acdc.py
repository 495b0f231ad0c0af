"""On the lent machine: unpack ``.gpu/acdc.tar`` (see ``pack_acdc.py``) into DEST/acdc-scribbles,
decoding the WebP images back to PNG.

    python3 benchmarks/device/unpack_acdc.py ../shared/datasets .gpu/acdc.tar
"""
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor

from PIL import Image

DEST, TAR = sys.argv[1], sys.argv[2]
ROOT = os.path.join(DEST, "acdc-scribbles")


def decode(name: str) -> None:
    Image.open(os.path.join(ROOT, "images_webp", name)).save(os.path.join(ROOT, "images", name[:-5] + ".png"), compress_level=1)


if __name__ == "__main__":
    os.makedirs(os.path.join(ROOT, "images"), exist_ok=True)
    with tarfile.open(TAR) as tar:
        tar.extractall(DEST, filter="data")
    names = os.listdir(os.path.join(ROOT, "images_webp"))
    with ProcessPoolExecutor(os.cpu_count()) as ex:
        list(ex.map(decode, names, chunksize=32))
    print(f"unpacked {len(names)} images into {ROOT}")
