"""lowlabel: label-efficient image segmentation.

    import lowlabel
    run = lowlabel.fit(lowlabel.load_config("configs/camvid-unimatch-cpu.yaml"))
    run.evaluate(split="test")
    run.predict(image)            # uint8 [H, W, 3] -> label map, any size (tiled)
    lowlabel.suggest(run, budget=10, strategy="hybrid", out="next.txt")   # what to label next

Nothing here touches devices, files or the environment at import time.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "fit", "load_config", "load_run", "suggest"]


def __getattr__(name):
    if name == "fit":
        from .api import fit

        return fit
    if name == "load_config":
        from .config import load_config

        return load_config
    if name == "load_run":
        from .engine.run import Run

        return Run.load
    if name == "suggest":
        from .label import suggest

        return suggest
    raise AttributeError(f"module 'lowlabel' has no attribute {name!r}")
