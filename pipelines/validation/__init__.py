"""Validation: decoding images safely, checking annotations, and the errors table."""
