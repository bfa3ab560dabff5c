"""Whether a run needs gradient checkpointing.

Checkpointing keeps only each layer's input and runs the layer's forward pass again during
the backward pass: up to half as much compute again per token (LoRA's backward pass costs
about one forward pass), for activations a few layers' worth instead of all of them. So a
run uses it only when its activations would not fit in the memory the device has left once
the model is loaded.

The estimate (`afina.core.estimate`, the one the API's estimate answers with) counts, per
token and layer, what the backward pass of LoRA on a frozen base keeps: the tensors around
attention and the gated MLP, and each LoRA layer's dropped-out input, plus the logits and
their gradient in float32 (what cross-entropy upcasts to). It leans high on purpose; a run
that the estimate lets through without checkpointing and that runs out of memory fails with
`out_of_memory`, which names the setting.
"""

from afina.core.estimate import LORA_DTYPE_BYTES, ModelShape

# The share of the free memory that the activations and the optimizer may take.
HEADROOM = 0.7


def needs_checkpointing(
    shape: ModelShape | None,
    *,
    tokens_per_step: int,
    dtype_bytes: int,
    trainable_parameters: int,
    free_bytes: int,
) -> bool:
    """True when the activations and logits of the largest batch, with the LoRA weights'
    gradients and AdamW state (float32: weight, gradient, two moments), would not fit in
    `free_bytes`, or when the model's shape is unknown."""
    if shape is None:
        return True
    per_token = (
        shape.activation_bytes_per_token(dtype_bytes, checkpointing=False)
        + shape.logits_bytes_per_token()
    )
    needed = 4 * LORA_DTYPE_BYTES * trainable_parameters + tokens_per_step * per_token
    return needed > HEADROOM * free_bytes
