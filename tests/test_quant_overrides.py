"""quantize_model's override patterns (issue 25, item 3): ``"name.*"`` names a layer called ``name`` too, the same
from Python and from a run config's ``quant.overrides``."""

import pytest
import torch

import qkd
from helpers import UserNet, digits_loaders, readme_block
from qkd.errors import QKDError
from qkd.models import create_model


def _bits(model: torch.nn.Module, name: str) -> tuple[int | None, int | None]:
    layer = model.get_submodule(name)
    return layer.weight_quant.bits, layer.act_quant.bits


def test_readme_override_example_sets_a_single_linear_head():
    """The README's {"head.*": ...} on a network whose head is one nn.Linear was refused as matching no layer."""
    example = readme_block("quantize_model(")
    x = torch.zeros(2, 1, 8, 8)
    scope = {"qkd": qkd, "my_float_model": UserNet(8), "train_loader": digits_loaders()[0], "x": x}
    exec(compile(example, "README.md", "exec"), scope)
    student = scope["student"]
    assert _bits(student, "head") == (8, 4)
    assert _bits(student, "stem.0") == _bits(student, "down.0") == (4, 4)


@pytest.mark.parametrize("pattern", ["fc.*", "fc", "f?.*"])
def test_run_config_override_names_the_layer_itself(tiny_config, pattern):
    cfg = tiny_config(f'quant.overrides={{"{pattern}": {{weight_bits: 3}}, "features.1.*": {{act_bits: 6}}}}')
    model = qkd.quantize_model(create_model(cfg.student.name, 10, **cfg.student.kwargs), cfg.quant)
    assert _bits(model, "fc") == (3, 8)  # the last layer, 8 bits but for the override
    assert _bits(model, "features.1.0") == (2, 6)


def test_override_matching_no_layer_names_the_closest_layers():
    with pytest.raises(QKDError, match=r"^override pattern 'hed\.\*' matches no Conv/Linear layer; .*\bhead\b"):
        qkd.quantize_model(UserNet(8), qkd.QuantConfig(overrides={"hed.*": {"weight_bits": 8}}))
