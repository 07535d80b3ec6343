"""What to quantize and how, as plain settings: bit-widths, quantizer choices, per-layer overrides.

No torch here, so that a run config is read and checked without it; the quantizers are in
:mod:`~qkd.quant.quantizer`, the model conversion in :mod:`~qkd.quant.convert`.
"""

from __future__ import annotations

import fnmatch
import functools
import re
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


BYTE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
COUNT_UNITS = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_AMOUNT = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_amount(value: object, units: dict[str, int], what: str, example: str) -> int:
    """``"150KiB"`` -> 153600 (with :data:`BYTE_UNITS`), ``"1.2G"`` -> 1200000000 (:data:`COUNT_UNITS`); a plain
    number is in the base unit. ValueError naming the units understood."""
    number, unit = (value, "") if isinstance(value, int | float) and not isinstance(value, bool) else (None, "")
    found = _AMOUNT.fullmatch(value) if isinstance(value, str) else None
    if found:
        number, unit = float(found.group(1)), found.group(2)
    scale = units.get(unit) if unit else 1
    if number is None or scale is None:
        raise ValueError(f"{what}={value!r} is not understood; give a number with one of the units "
                         f"{', '.join(units)} (or none), e.g. {what}={example}")  # fmt: skip
    amount = float(number) * scale
    if not amount > 0 or amount != amount or amount == float("inf"):
        raise ValueError(f"{what}={value!r} must be a positive amount, e.g. {what}={example}")
    return round(amount)


@dataclass
class Budget:
    """A size or cost budget that chooses each layer's bits (``qkd.quant.budget``) instead of one bit-width.

    Exactly one of ``weights`` (bytes of packed weight codes: every quantized layer's weights at its bits, a float
    layer's at 32; biases, steps and zero points not counted; ``"150KiB"``, ``"0.2MiB"``, ``"150000B"``, a plain
    number of bytes) or ``bops`` (bit operations per image at the model's input size: the sum over layers of
    MACs x weight bits x activation bits, float sides at 32; ``1.2e9``, ``"1.2G"``). Each allocated layer gets one
    width from ``bits`` for its weights and its input alike (W b A b).

    >>> QuantConfig(budget=Budget(weights="150KiB", bits=[2, 3, 4, 8]))
    """

    __pydantic_config__ = {"extra": "forbid"}

    weights: int | str | None = None
    bops: int | float | str | None = None
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])

    def __post_init__(self) -> None:
        if (self.weights is None) == (self.bops is None):
            raise ValueError("a budget is quant.budget.weights (e.g. 150KiB) or quant.budget.bops (e.g. 1.2G): "
                             "give exactly one")  # fmt: skip
        self.limit  # noqa: B018 -- parsed now: a unit not understood is refused when the config is read
        if not isinstance(self.bits, list | tuple) or not self.bits or any(parse_bits(b) is None for b in self.bits):
            raise ValueError(f"quant.budget.bits must be a list of bit-widths from 2 to 8, e.g. [2, 3, 4, 8]; "
                             f"got {self.bits!r}")  # fmt: skip
        self.bits = sorted(set(self.bits))

    @property
    def unit(self) -> str:
        """``weights`` or ``bops``: what the budget limits."""
        return "weights" if self.weights is not None else "bops"

    @property
    def limit(self) -> int:
        """The budget in bytes (``weights``) or bit operations (``bops``)."""
        if self.weights is not None:
            return parse_amount(self.weights, BYTE_UNITS, "quant.budget.weights", "150KiB")
        return parse_amount(self.bops, COUNT_UNITS, "quant.budget.bops", "1.2G")

    def format(self, amount: float) -> str:
        """``amount`` in this budget's unit, readably: ``149.3 KiB`` or ``1.21 GBOPs``."""
        if self.unit == "weights":
            return f"{amount / 1024:.1f} KiB" if amount < 2**20 else f"{amount / 2**20:.2f} MiB"
        return f"{amount / 1e9:.3g} GBOPs" if amount >= 1e8 else f"{amount / 1e6:.3g} MBOPs"


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
    - ``budget``: a :class:`Budget` (or its dict): each layer's bits (weights and input alike) are chosen before
      training to meet it with the least measured sensitivity (:mod:`qkd.quant.budget`); they replace
      ``weight_bits``/``act_bits``, except at layers the first/last rule or ``overrides`` set, which keep theirs.
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
    budget: Budget | None = None
    ptq: str = "calibrate"
    ptq_images: int = 512
    ptq_iters: int = 500

    def __post_init__(self) -> None:
        self.weight_bits, self.act_bits = parse_bits(self.weight_bits), parse_bits(self.act_bits)
        if isinstance(self.budget, dict):
            self.budget = Budget(**self.budget)
        if self.budget is not None and None in (self.weight_bits, self.act_bits):
            raise ValueError("a budget chooses weight and activation bits together; drop weight_bits/act_bits=float "
                             "or the budget")  # fmt: skip
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


def _refusing_bits_with_budget(init):  # noqa: ANN001, ANN202 (wraps the dataclass's generated __init__)
    """``QuantConfig(budget=..., weight_bits=4)``: refused where it is known that the bits were given (its
    ``__post_init__`` cannot tell a given 4 from the default; pydantic and the config files do not call ``__init__``,
    they refuse by the keys written; ``dataclasses.replace`` passes every field, and qkd drops the budget there)."""

    @functools.wraps(init)
    def __init__(self: QuantConfig, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        given = [key for i, key in enumerate(("weight_bits", "act_bits")) if key in kwargs or len(args) > i]
        refuse_bits_with_budget(self.budget, given)

    return __init__


QuantConfig.__init__ = _refusing_bits_with_budget(QuantConfig.__init__)


def refuse_bits_with_budget(budget: object, given: list[str]) -> None:
    """A budget chooses the bits: refuse it together with ``weight_bits``/``act_bits`` given by the user (``given``:
    those settings as they were written, e.g. ``["quant.weight_bits=4"]``)."""
    if budget is not None and given:
        them = "them" if len(given) > 1 else "it"
        raise ValueError(f"{' and '.join(given)} with quant.budget: the budget chooses every layer's bits; drop "
                         f"{them} (quant.overrides fixes single layers) or the budget")  # fmt: skip


def matches(name: str, pattern: str) -> bool:
    """An override ``pattern`` (fnmatch) matches the layer ``name``; ``"head.*"`` matches ``head`` itself too."""
    return fnmatch.fnmatchcase(name, pattern) or (pattern.endswith(".*") and fnmatch.fnmatchcase(name, pattern[:-2]))
