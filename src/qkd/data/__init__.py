"""Data: named sources behind :func:`build_data`, served from device memory by :class:`TensorLoader`."""

from qkd.data.sources import DataBundle, build_data, list_datasets
from qkd.data.tensor_loader import TensorLoader

__all__ = ["DataBundle", "TensorLoader", "build_data", "list_datasets"]
