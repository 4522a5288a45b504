"""blip3o: an open, tested implementation of BLIP3-o (unified image understanding and generation)."""

__version__ = "0.1.0"
