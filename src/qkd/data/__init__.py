"""Data: named sources behind :func:`build_data`, served from device memory by :class:`TensorLoader`.

``options`` defines the data options once; ``sources`` is the registry of names; ``arrays`` the in-memory
sources (digits, CIFAR, npz), ``stream`` the streamed one (image folders, :class:`StreamLoader`), ``splits``
the validation split, limits and statistics, ``factory`` user factories by import path, ``tensor_loader``
and ``augment`` the in-memory loader, ``jpeg`` the tensor decoders.
"""

from qkd.data.options import DataBundle, DataOptions
from qkd.data.sources import build_data, list_datasets
from qkd.data.tensor_loader import TensorLoader

__all__ = ["DataBundle", "DataOptions", "TensorLoader", "build_data", "list_datasets"]
