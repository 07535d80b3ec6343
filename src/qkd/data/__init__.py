"""Data: named sources behind :func:`build_data`, served from device memory by :class:`TensorLoader`.

``options`` defines the data options once; ``sources`` is the registry of names; ``arrays`` the in-memory
sources (digits, CIFAR, npz), ``stream`` the streamed one (image folders, :class:`StreamLoader`), ``splits``
the validation split, limits and statistics, ``factory`` user factories by import path, ``tensor_loader``
and ``augment`` the in-memory loader, ``jpeg`` the tensor decoders.
"""

from qkd.lazy import lazy_names

__getattr__, __all__ = lazy_names(__name__, {
    "options": ("DataBundle", "DataOptions"),
    "sources": ("build_data", "list_datasets"),
    "tensor_loader": ("TensorLoader",),
})  # fmt: skip
