import torch
import torch.distributed as dist

from qkd.dist import broadcast_state, is_main_process, rank, resolve_device
from qkd.models import create_model
from qkd.quant import QuantConfig, calibrate, quantize_model


def test_single_process_defaults():
    assert rank() == 0 and is_main_process()
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_broadcast_inside_a_process_group(tmp_path):
    """Under a (one-process, gloo) group the broadcast runs and leaves rank 0's state intact."""
    model = quantize_model(create_model("tiny_cnn", width=4), QuantConfig())
    calibrate(model, torch.randn(8, 1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        broadcast_state(model)
        assert is_main_process()
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
