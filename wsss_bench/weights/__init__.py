"""Readers and writers for pretrained-weight file formats (MXNet ``.params``, ...)."""
