"""Training, feature extraction and CAM inference."""
