"""What to quantize and how, as plain settings: bit-widths, quantizer choices, per-layer overrides.

No torch here, so that a run config is read and checked without it; the quantizers are in
:mod:`~qkd.quant.quantizer`, the model conversion in :mod:`~qkd.quant.convert`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

STEP_INITS = ("mse", "lsq")
PTQ_MODES = ("calibrate", "adaround")
QUANTIZER_NAMES = ("interval", "lsq")  # the quantizers of qkd.quant.quantizer (a test holds the two alike)
EDGE = "first/last layer with first_last_bits=float"
ALL_FLOAT = "weight_bits=float and act_bits=float"


def parse_bits(value: object) -> int | None:
    """Normalise a bit-width: an int in 2..8, or None / "float" / "off" / False for float."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("float", "off")):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, or 'float'; got {value!r}")
    return value


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``signed=None`` decides from data on the first tensor seen (activations after ReLU are unsigned).
    ``per_channel`` gives each output channel its own parameters; weights only. ``channel_dim`` is the
    weight dimension holding the output channels: 0 for Conv/Linear, 1 for ConvTranspose (weights of
    shape ``(in, out / groups, ...)``); the quantizer moves it to dim 0 to quantize, so parameters and
    :meth:`Quantizer.affine` are shaped ``(C, 1, ...)`` for that moved layout.
    ``step_init`` sets the LSQ step from data: ``mse`` (the step that minimises the quantization error
    of the first tensor seen, searched over clipping ranges) or ``lsq`` (the LSQ paper's
    ``2 * mean|x| / sqrt(Qp)``).
    ``integer_zero_point`` (interval only): the learned lower bound is snapped, in the forward, to an integer
    multiple of the step, so the grid's zero point is an integer (an exporter stores it as a zero point instead
    of a float offset around the quantizer).

    >>> q = make_quantizer(QuantSpec(bits=4, signed=True, per_channel=True), init=torch.randn(8, 3, 3, 3))
    """

    bits: int | None = 4
    signed: bool | None = None
    per_channel: bool = False
    method: str = "lsq"
    step_init: str = "mse"
    channel_dim: int = 0
    integer_zero_point: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", parse_bits(self.bits))
        if self.channel_dim not in (0, 1):
            raise ValueError(f"channel_dim must be 0 or 1; got {self.channel_dim!r}")
        check_choices(self.method, self.step_init)


def check_choices(method: str, step_init: str) -> None:
    """A quantizer name and a step initialisation this module knows; ValueError naming the valid ones."""
    if method not in QUANTIZER_NAMES:
        raise ValueError(f"unknown quantizer '{method}'; valid: {', '.join(QUANTIZER_NAMES)}")
    if step_init not in STEP_INITS:
        raise ValueError(f"unknown step_init '{step_init}'; valid: {', '.join(STEP_INITS)}")


@dataclass
class QuantConfig:
    """Bit-widths and quantizer choice for a whole model.

    - ``weight_bits`` / ``act_bits``: 2..8, or None (or "float") to leave that side in float.
    - ``method``: a quantizer name (``lsq`` or ``interval``); ``per_channel``: weight steps per
      output channel. Activations are always per tensor.
    - ``bn_batches``: after the quantizers are initialised, re-estimate BatchNorm statistics of the
      quantized network on this many training batches (0 = keep the float statistics); quantized
      activations shift the statistics, and a pretrained network collapses at 2-3 bits without it.
    - ``step_init``: how LSQ steps start, ``mse`` (least quantization error on the first tensor
      seen) or ``lsq`` (the LSQ paper's ``2 mean|x| / sqrt(Qp)``).
    - ``first_last_bits``: bits of the first and last quantized layers (8 by default, the usual
      practice); "same" uses ``weight_bits``/``act_bits`` there too, None keeps them float. A side
      whose ``weight_bits``/``act_bits`` is float stays float at the edges as well.
    - ``overrides``: module-name patterns (fnmatch, e.g. ``"layer3.*"``) mapped to
      ``{"weight_bits": .., "act_bits": ..}``; later patterns win. ``"name.*"`` also matches a layer
      called ``name`` itself (``"head.*"``: every layer in the head, or the head where it is one Linear).
      A pattern must match at least one Conv/Linear-like layer of the model (a typo is an error, not a
      silent no-op).
    - ``integer_zero_point`` (``method: interval``): keep every grid's zero point an integer by snapping the
      learned lower bound to a multiple of the step in the forward (straight-through), so that a QDQ ONNX export
      stores it as an integer zero point; off, the lower bound is free and such a layer's QDQ keeps a float
      offset (Sub/Add) around its quantizer, which onnxruntime cannot fuse into integer kernels.
    - ``ptq`` (``method: ptq`` runs, post-training quantization): ``calibrate`` (the quantizers from a batch and
      the BatchNorm statistics re-estimated, as every run starts) or ``adaround``, which then chooses each weight's
      rounding layer by layer (:mod:`~qkd.quant.adaround`) on ``ptq_images`` training images, ``ptq_iters`` Adam
      steps per layer.
    """

    __pydantic_config__ = {"extra": "forbid"}  # read when the run config embeds this class

    weight_bits: int | str | None = 4
    act_bits: int | str | None = 4
    method: str = "lsq"
    step_init: str = "mse"
    bn_batches: int = 20
    per_channel: bool = True
    first_last_bits: int | str | None = 8
    overrides: dict[str, dict[str, int | str | None]] = field(default_factory=dict)
    integer_zero_point: bool = False
    ptq: str = "calibrate"
    ptq_images: int = 512
    ptq_iters: int = 500

    def __post_init__(self) -> None:
        self.weight_bits, self.act_bits = parse_bits(self.weight_bits), parse_bits(self.act_bits)
        if self.first_last_bits != "same":
            self.first_last_bits = parse_bits(self.first_last_bits)
        check_choices(self.method, self.step_init)
        if self.integer_zero_point and self.method != "interval":
            raise ValueError("integer_zero_point applies to method interval (lsq grids have zero point 0 already); "
                             "drop it or set method: interval")  # fmt: skip
        if not isinstance(self.bn_batches, int) or self.bn_batches < 0:
            raise ValueError(f"bn_batches must be a non-negative integer; got {self.bn_batches!r}")
        if self.ptq not in PTQ_MODES:
            raise ValueError(f"unknown ptq '{self.ptq}'; valid: {', '.join(PTQ_MODES)}")
        for key in ("ptq_images", "ptq_iters"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer; got {value!r}")
        for pattern, bits in self.overrides.items():
            unknown = set(bits) - {"weight_bits", "act_bits"}
            if unknown:
                raise ValueError(f"override '{pattern}' has unknown keys {sorted(unknown)}; use weight_bits/act_bits")
            self.overrides[pattern] = {k: parse_bits(v) for k, v in bits.items()}

    def bits_for(self, name: str, is_edge: bool) -> tuple[int | None, int | None]:
        """Weight and activation bits of the layer called ``name``."""
        return self.resolve(name, is_edge)[:2]

    def resolve(self, name: str, is_edge: bool) -> tuple[int | None, int | None, str]:
        """:meth:`bits_for` and the last rule that set a side to float (why the layer is float, if it is)."""
        wb, ab, why = self.weight_bits, self.act_bits, ALL_FLOAT
        if is_edge and self.first_last_bits != "same":
            # A side configured as float stays float at the edges too (e.g. weight-only quantization).
            wb = None if wb is None else self.first_last_bits
            ab = None if ab is None else self.first_last_bits
            why = EDGE if self.first_last_bits is None and (wb, ab) != (self.weight_bits, self.act_bits) else why
        for pattern, bits in self.overrides.items():
            if matches(name, pattern):
                wb, ab = bits.get("weight_bits", wb), bits.get("act_bits", ab)
                why = f"override pattern '{pattern}' sets float" if None in bits.values() else why
        return wb, ab, why

    def specs(self, weight_bits: int | None, act_bits: int | None) -> tuple[QuantSpec, QuantSpec]:
        """The weight and input quantizer specs of a layer with these bits."""
        common = {"method": self.method, "step_init": self.step_init, "integer_zero_point": self.integer_zero_point}
        return (
            QuantSpec(weight_bits, signed=True, per_channel=self.per_channel, **common),
            QuantSpec(act_bits, signed=None, per_channel=False, **common),
        )


def matches(name: str, pattern: str) -> bool:
    """An override ``pattern`` (fnmatch) matches the layer ``name``; ``"head.*"`` matches ``head`` itself too."""
    return fnmatch.fnmatchcase(name, pattern) or (pattern.endswith(".*") and fnmatch.fnmatchcase(name, pattern[:-2]))
