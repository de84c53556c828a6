"""Data layer: VOC-layout reading and image transforms."""
