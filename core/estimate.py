"""What a LoRA/QLoRA run will take, worked out from a model's `config.json` alone: its memory,
part by part, and the compute per token its time follows from. No weights are loaded and
torch is not imported, so the API can answer in milliseconds.

The model is read as a decoder-only transformer with a gated MLP (Llama, Mistral, Qwen,
Gemma and most current open models): per layer `q, k, v, o` and `gate, up, down`
projections, two norms; embeddings and an LM head (tied or not). A model of another shape
gets the same formulas from its sizes, an approximation.

Memory (bytes), the parts a CUDA allocator holds at the peak of a step:

- base weights as loaded: the decoder's linear layers at `bits` (4: 0.5 byte a weight plus
  bitsandbytes' constants, one float32 scale per 64 weights, or with double quantization one
  byte per 64 and a float32 per 256 blocks; 8: a byte plus one float32 per output row), the
  rest (embeddings, LM head, norms) in the compute dtype;
- LoRA parameters: `r x (in + out)` for each adapted linear layer, float32 (afina keeps the
  trainable weights in float32);
- gradients and AdamW state: a float32 gradient and two float32 moments per LoRA weight;
- activations: what the forward pass keeps for the backward pass, per token and layer (the
  tensors around attention and the gated MLP, and each LoRA layer's input) in the compute
  dtype; with gradient checkpointing only each layer's input, plus one layer recomputed;
- the LM head's logits: float32 logits, their softmax and their gradient for every token of
  the step.

Compute (`ModelShape.training_flops`): a forward pass costs `2 x` the weights a token goes
through (embeddings excluded) plus causal attention; training LoRA on a frozen base costs
about two forward passes' worth (the backward pass computes the inputs' gradients, not the
frozen weights'), and gradient checkpointing adds a third.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

GIB = 1024**3
MIB = 1024**2
QUANT_BLOCK = 64  # bitsandbytes' 4-bit block size
DOUBLE_QUANT_BLOCK = 256  # blocks per second-level scale
LORA_DTYPE_BYTES = 4
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Names a config may give each size by: transformers' own, then GPT-2's and others'.
_NAMES = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "vocabulary": ("vocab_size",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads"),
}


def _first(config: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def size(size: float) -> str:
    """Bytes as people read them: GiB from one GiB up, else MiB."""
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / MIB:.1f} MiB"


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    vocabulary: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> "ModelShape | None":
        """The shape a `config.json` gives (a multimodal model's text part); None when it
        does not give the hidden size, the layers and the vocabulary."""
        text = config.get("text_config")
        if isinstance(text, Mapping):
            config = {**config, **text}
        hidden = _first(config, _NAMES["hidden"])
        layers = _first(config, _NAMES["layers"])
        vocabulary = _first(config, _NAMES["vocabulary"])
        if not (hidden and layers and vocabulary):
            return None
        heads = _first(config, _NAMES["heads"]) or 1
        kv_heads = _first(config, _NAMES["kv_heads"]) or (1 if config.get("multi_query") else heads)
        return cls(
            hidden=hidden,
            layers=layers,
            vocabulary=vocabulary,
            intermediate=_first(config, _NAMES["intermediate"]) or 4 * hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=_first(config, ("head_dim",)) or hidden // heads,
            # Absent, it is counted untied: the larger model.
            tied_embeddings=config.get("tie_word_embeddings") is True,
        )

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear projections: name -> (in, out) features."""
        attention, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, attention),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (attention, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    @property
    def linear_parameters(self) -> int:
        """The weights of every decoder layer's linear projections (what gets quantized)."""
        return self.layers * sum(i * o for i, o in self.linear_layers().values())

    @property
    def embedding_parameters(self) -> int:
        return self.vocabulary * self.hidden

    @property
    def head_parameters(self) -> int:
        """The LM head's own weights: none when it shares the embeddings'."""
        return 0 if self.tied_embeddings else self.vocabulary * self.hidden

    @property
    def norm_parameters(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def parameters(self) -> int:
        return (
            self.linear_parameters
            + self.embedding_parameters
            + self.head_parameters
            + self.norm_parameters
        )

    def lora_parameters(self, r: int, target_modules: str | list[str]) -> int:
        """LoRA's weights on the named projections ("all-linear": every one; names match
        a projection's own name or a dotted path ending in it)."""
        adapted = [
            (i, o)
            for name, (i, o) in self.linear_layers().items()
            if target_modules == "all-linear"
            or any(t == name or t.endswith("." + name) for t in target_modules)
        ]
        return self.layers * sum(r * (i + o) for i, o in adapted)

    def activation_bytes_per_token(self, dtype_bytes: int, *, checkpointing: bool) -> int:
        """What one token's forward pass keeps for the backward pass, logits apart."""
        kv = self.kv_heads * self.head_dim
        attention = self.heads * self.head_dim
        # norms and residuals; q and attention's output; k and v; gate, up and their
        # product; the inputs LoRA keeps (its own dropped-out copy for each projection)
        per_layer = (
            5 * self.hidden
            + 2 * attention
            + 2 * kv
            + 3 * self.intermediate
            + (5 * self.hidden + attention + self.intermediate)
        )
        if checkpointing:  # each layer's input, and one layer recomputed at a time
            return (self.layers * self.hidden + per_layer) * dtype_bytes
        return self.layers * per_layer * dtype_bytes

    def logits_bytes_per_token(self) -> int:
        """float32 logits, their softmax and their gradient (cross-entropy upcasts)."""
        return 3 * 4 * self.vocabulary

    def training_flops(
        self, lengths: Sequence[int], *, lora_parameters: int, checkpointing: bool
    ) -> float:
        """FLOPs to train LoRA once over examples of these lengths (in tokens). Per token:
        the frozen weights (the decoder's and the LM head's) 2 forward and 2 for the input
        gradient, no weight gradient; the LoRA weights 6; causal attention 4 x its position
        x the attention width of all layers forward (QK^T and AV), twice that backward.
        Checkpointing runs the forward pass again."""
        frozen = self.linear_parameters + self.vocabulary * self.hidden
        width = self.layers * self.heads * self.head_dim
        tokens = sum(lengths)
        # summed over a sequence's positions: 4 x width x length^2 / 2
        attention = sum(2 * length * length * width for length in lengths)
        flops = 4 * frozen * tokens + 6 * lora_parameters * tokens + 3 * attention
        if checkpointing:
            flops += 2 * (frozen + lora_parameters) * tokens + attention
        return flops


def base_weight_bytes(
    shape: ModelShape, *, bits: int | None, double_quant: bool, dtype_bytes: int
) -> int:
    """The base model's weights as loaded: decoder linears at `bits`, the rest (and every
    weight when `bits` is None) in the compute dtype."""
    rest = shape.embedding_parameters + shape.head_parameters + shape.norm_parameters
    linear = shape.linear_parameters
    if bits is None:
        return (linear + rest) * dtype_bytes
    if bits == 8:
        rows = shape.layers * sum(o for _, o in shape.linear_layers().values())
        return linear + 4 * rows + rest * dtype_bytes
    scales = (
        linear / QUANT_BLOCK + 4 * linear / (QUANT_BLOCK * DOUBLE_QUANT_BLOCK)
        if double_quant
        else 4 * linear / QUANT_BLOCK
    )
    return math.ceil(linear / 2 + scales) + rest * dtype_bytes


class Memory(BaseModel):
    """Bytes, part by part; `activations` is what the run uses (with or without gradient
    checkpointing), and `total` adds it to the rest."""

    base_weights: int
    lora_parameters: int
    gradients_and_optimizer: int
    activations: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    logits: int
    total: int


def memory(
    shape: ModelShape,
    *,
    bits: int | None,
    double_quant: bool,
    dtype_bytes: int,
    lora_r: int,
    target_modules: str | list[str],
    tokens_per_step: int,
    checkpointing: bool,
) -> Memory:
    """The memory of one run at its peak, for `tokens_per_step` tokens in its largest step."""
    trainable = shape.lora_parameters(lora_r, target_modules)
    without = tokens_per_step * shape.activation_bytes_per_token(dtype_bytes, checkpointing=False)
    with_ = tokens_per_step * shape.activation_bytes_per_token(dtype_bytes, checkpointing=True)
    parts = {
        "base_weights": base_weight_bytes(
            shape, bits=bits, double_quant=double_quant, dtype_bytes=dtype_bytes
        ),
        "lora_parameters": LORA_DTYPE_BYTES * trainable,
        "gradients_and_optimizer": 3 * LORA_DTYPE_BYTES * trainable,
        "activations": with_ if checkpointing else without,
        "logits": tokens_per_step * shape.logits_bytes_per_token(),
    }
    return Memory(
        **parts,
        activations_without_checkpointing=without,
        activations_with_checkpointing=with_,
        total=sum(parts.values()),
    )


def tokens_per_step(lengths: list[int], batch_size: int, *, padding_free: bool) -> int:
    """The most tokens one batch of these examples can hold: the longest ones end to end when
    padding-free, else `batch_size` rows as long as the longest."""
    longest = sorted(lengths, reverse=True)[:batch_size]
    if padding_free:
        return sum(longest)
    return batch_size * (longest[0] if longest else 0)


# Dense bfloat16/float16 tensor FLOPs a second by GPU (the vendors' data sheets), matched
# against the name torch gives the device, the first that the name contains.
GPU_PEAK_FLOPS = (
    ("H200", 989e12),
    ("A10G", 70e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),
    ("T4", 65e12),
)
UNKNOWN_GPU_FLOPS = 65e12  # the slowest GPU above: an unknown one is not promised more
CPU_FLOPS_PER_CORE = 2.5e9 * 32  # 2.5 GHz, two AVX2 float32 FMA units
# The share of the peak a LoRA run achieves (model FLOPs utilisation): 4-bit bases pay for
# dequantizing every weight at every use. Rough figures; a worker's own measured
# throughput replaces them after its first job on a model of that size.
EFFICIENCY = {"cuda": {4: 0.15, 8: 0.1, None: 0.3}, "cpu": {4: 0.02, 8: 0.02, None: 0.05}}


def peak_flops(device_kind: str, device_name: str, cores: int) -> float:
    """The FLOPs a second a device can do at most: a GPU's data sheet figure, or the CPU's
    cores times what AVX2 does a cycle."""
    if device_kind == "cuda":
        return next(
            (flops for name, flops in GPU_PEAK_FLOPS if name in device_name), UNKNOWN_GPU_FLOPS
        )
    return cores * CPU_FLOPS_PER_CORE


def flops_model_seconds(
    flops: float, *, device_kind: str, device_name: str, cores: int, bits: int | None
) -> float:
    """Seconds for `flops` of training at the device's peak times the usual efficiency."""
    efficiency = EFFICIENCY["cuda" if device_kind == "cuda" else "cpu"][bits]
    return flops / (peak_flops(device_kind, device_name, cores) * efficiency)
