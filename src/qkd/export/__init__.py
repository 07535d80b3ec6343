"""Deployment: packed integer checkpoints, an integer reference engine, and ONNX with QDQ nodes."""
