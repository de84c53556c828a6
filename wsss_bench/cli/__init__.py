"""The ``wsss`` command line."""
