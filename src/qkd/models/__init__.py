"""Model zoo: importing this package registers every built-in model."""

from qkd.models import cifar_resnet, mobilenetv2, tiny, tv  # noqa: F401  (imported to register models)
from qkd.models.registry import create_model, list_models, load_pretrained, register_model

__all__ = ["create_model", "list_models", "load_pretrained", "register_model"]
