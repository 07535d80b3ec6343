"""The package version, in a module of its own: modules that record it (checkpoints, exports, reports) import
it from here, not from the package that imports them."""

__version__ = "0.1.0"
