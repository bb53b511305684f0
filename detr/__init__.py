"""DETR model library: plain PyTorch, no Ray or MLflow."""
