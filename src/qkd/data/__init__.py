"""Data: named sources behind :func:`build_data`, served from device memory by :class:`TensorLoader`.

``options`` defines the data options once; ``sources`` holds the built-in sources, ``factory`` user
factories by import path, ``tensor_loader`` and ``augment`` the in-memory loader.
"""

from qkd.data.options import DataBundle, DataOptions
from qkd.data.sources import build_data, list_datasets
from qkd.data.tensor_loader import TensorLoader

__all__ = ["DataBundle", "DataOptions", "TensorLoader", "build_data", "list_datasets"]
