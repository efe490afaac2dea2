"""Model configuration: presets, the receptive field, the product precisions, JSON round trip.
No TensorFlow here, so the CLI and the data pipeline can read a run's config without importing
it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import DwaveError
from ..store.audio import DEFAULT_QUANTIZATION_CHANNELS, DEFAULT_SAMPLE_RATE

PRESETS: dict[str, dict] = {
    # For tests and the demo: seconds per hundred steps on a laptop core.
    "tiny": dict(stacks=2, max_dilation=32, residual_channels=16, dilation_channels=16,
                 skip_channels=32),
    "small": dict(stacks=2, max_dilation=256, residual_channels=32, dilation_channels=32,
                  skip_channels=128),
    # The common reference size (the paper's and most reimplementations').
    "base": dict(stacks=3, max_dilation=512, residual_channels=64, dilation_channels=64,
                 skip_channels=256),
    # A receptive field of over a second (16,384 samples, 1.02 s at 16 kHz): the WaveNet paper
    # found a large one crucial for music. `small`'s channels, so a short run fits a laptop;
    # a step does 2.9x `small`'s product work at the same window (ModelConfig.products: the
    # receptive field's extra inputs in every layer): a GPU's preset for a real run.
    "music": dict(stacks=2, max_dilation=4096, residual_channels=32, dilation_channels=32,
                  skip_channels=128),
}


DEFAULT_PRESET = "tiny"
# The global condition a conditioned model uses unless told otherwise: the store records genres.
DEFAULT_CONDITION = "genre"

# --precision: the type of the matrix products (everything else, weights included, is float32;
# dwave.model.network maps each to its TensorFlow dtype).
PRECISIONS: dict[str, str] = {
    "fp32": "float32",
    "bf16": "bfloat16, no loss scaling (CPUs with AVX512-BF16 or AMX, A100/H100 GPUs)",
    "mixed": "float16 with loss scaling (GPUs)",
}

# The architecture fields a new run may set over its preset, with what each means: `dwave
# train` makes one flag of each (--residual-channels N, ...).
MODEL_FLAGS: dict[str, str] = {
    "residual_channels": "residual channels",
    "dilation_channels": "filter and gate channels, each",
    "skip_channels": "skip channels",
    "stacks": "dilation stacks",
    "max_dilation": "largest dilation of a stack (a power of 2)",
    "input_kernel": "codes the input layer reads: 2 = the current and the one before, 1 = the "
                    "current only",
}


@dataclass
class ModelConfig:
    """The architecture. Saved as config.json in every run directory."""

    quantization_channels: int = DEFAULT_QUANTIZATION_CHANNELS
    residual_channels: int = 64
    dilation_channels: int = 64  # for each of filter and gate
    skip_channels: int = 256
    stacks: int = 3
    max_dilation: int = 512  # each stack has dilations 1, 2, 4, ..., max_dilation
    # The input layer: the embedding of the current code, plus with 2 that of the code before
    # (the reference WaveNet's width-2 causal convolution of one-hot codes). Run dirs written
    # before this field existed used 1 (from_dict).
    input_kernel: int = 2
    # Global conditioning: `condition` names the track attribute (in the store's index) the
    # model is conditioned on, `condition_values` its values, one embedding row each; empty:
    # unconditioned. Genre is the one the store records today (dwave.store.metadata); another (an
    # artist, a label column) needs the metadata reader and the store index, not the model.
    condition: str = DEFAULT_CONDITION
    condition_values: list[str] = field(default_factory=list)
    sample_rate: int = DEFAULT_SAMPLE_RATE

    def __post_init__(self):
        for name in ("quantization_channels", "residual_channels", "dilation_channels",
                     "skip_channels", "stacks", "max_dilation", "sample_rate"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise DwaveError(f"model config: {name} must be a positive integer")
        if self.input_kernel not in (1, 2):
            raise DwaveError(f"model config: input_kernel must be 1 or 2, got {self.input_kernel}")
        if self.max_dilation & (self.max_dilation - 1):
            raise DwaveError(f"model config: max_dilation must be a power of 2, got "
                             f"{self.max_dilation}")

    @property
    def dilations(self) -> list[int]:
        per_stack = [2**i for i in range(self.max_dilation.bit_length())]
        return per_stack * self.stacks

    @property
    def receptive_field(self) -> int:
        """Inputs that one output sees: (kernel - 1) * sum(dilations) + input_kernel, kernel 2."""
        return sum(self.dilations) + self.input_kernel

    def span(self, window: int) -> int:
        """Samples read from the store to predict `window` of them: one receptive field more
        (valid mode: the first prediction needs receptive_field inputs, the last has none)."""
        return self.receptive_field + window

    @property
    def conditioned(self) -> bool:
        return bool(self.condition_values)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "ModelConfig":
        if preset not in PRESETS:
            raise DwaveError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if "genres" in data:  # run dirs written before conditions had a name
            data = {**{k: v for k, v in data.items() if k != "genres"}, "condition": "genre",
                    "condition_values": data["genres"]}
        data = {"input_kernel": 1, **data}  # run dirs written before the field: current code only
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DwaveError(f"model config: unknown fields {sorted(unknown)}")
        return cls(**data)

    def products(self, window: int, batch: int = 1) -> list[tuple[str, int, int, int]]:
        """The forward pass's matrix products in training (valid mode, `window` predicted
        samples per sequence) as (name, m, k, n): an (m, k) @ (k, n) product each, as
        dwave.model.network computes them. The backward pass does two more of each shape's size."""
        C, D, S, Q = (self.residual_channels, self.dilation_channels, self.skip_channels,
                      self.quantization_channels)
        length = window + sum(self.dilations)  # the input layer's outputs per sequence
        layers = len(self.dilations)
        out = []
        for i, d in enumerate(self.dilations):
            length -= d
            out.append((f"layer{i}/conv", batch * length, 2 * C, 2 * D))
            if i < layers - 1:
                out.append((f"layer{i}/residual", batch * length, D, C))
        out += [("skip", batch * window, layers * D, S), ("head1", batch * window, S, S),
                ("head2", batch * window, S, Q)]
        return out

    def training_flops_per_sample(self, window: int) -> float:
        """Floating-point operations of one training step's products per predicted sample:
        2mkn per product, three products (forward, input gradient, weight gradient) each."""
        return sum(3 * 2 * m * k * n for _, m, k, n in self.products(window)) / window

    def describe(self) -> str:
        return (f"WaveNet: {len(self.dilations)} layers ({self.stacks} stacks x dilations 1.."
                f"{self.max_dilation}), channels residual {self.residual_channels} / dilation "
                f"{self.dilation_channels} / skip {self.skip_channels}, input "
                f"{'codes t-1, t' if self.input_kernel == 2 else 'code t'}, receptive field "
                f"{self.receptive_field} samples ({1000 * self.receptive_field / self.sample_rate:.0f}"
                f" ms at {self.sample_rate} Hz)"
                + (f", conditioned on {len(self.condition_values)} values of {self.condition}"
                   if self.condition_values else ""))
