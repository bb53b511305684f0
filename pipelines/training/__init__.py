"""Training data: samples with the paper's augmentation, Ray Data datasets, batches."""
