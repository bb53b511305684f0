"""Inference: a model ready to predict (`Detector`), panoptic segmentation, drawing."""
