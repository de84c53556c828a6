"""CAM files, mIoU and result tables."""

#: The constant background score of the ``fixed`` threshold policy (IRN's and SC-CAM's 0.15).
#: Kept here, in a module that imports nothing, so the command line can show it without torch.
DEFAULT_THRESHOLD = 0.15
