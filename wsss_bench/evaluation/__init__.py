"""CAM files, mIoU and result tables."""
