"""Jobs: the `detr` command line and its entry points (train, evaluate, label, promote, ...)."""
