"""Ray Data pipelines: image stores, annotation formats, validation, augmentation, batching."""
