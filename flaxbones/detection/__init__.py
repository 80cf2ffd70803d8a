"""Object detection and instance segmentation: ops, transforms and detectors (torchvision's)."""
