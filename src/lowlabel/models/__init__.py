from .segmenter import ENCODERS, SMP_ARCHS, Segmenter, build_model, load_pretrained

__all__ = ["ENCODERS", "SMP_ARCHS", "Segmenter", "build_model", "load_pretrained"]
