"""A tiny random-weight Llama model and byte-level BPE tokenizer, built offline.

Tests and `afina demo-model` use it to drive the real code path (4-bit quantization, LoRA,
SFT, adapter saving, generation) in seconds on a CPU, with no model hub.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

from afina.core.chat_format import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512
MAX_POSITIONS = 512


@dataclass(frozen=True)
class ModelShape:
    """The Llama shape to build: the demo's by default; benchmarks ask for bigger ones.
    `vocab_size` None: the tokenizer's own (a larger one only widens the embeddings and LM
    head, which is what a benchmark wants of it)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = MAX_POSITIONS
    vocab_size: int | None = None


# Enough text for the BPE merges to learn common English pieces; any other text still
# tokenizes, byte by byte.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A user uploads a dataset and starts a job.
What is the capital of France? The capital of France is Paris. Answer the question briefly.
You are a helpful assistant. Please translate the sentence into French. Bonjour le monde.
Fine-tuning adapts a pretrained language model to a task with a small set of examples.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 + - = ?
Below is an instruction that describes a task. Write a response that completes the request.
### Instruction: ### Input: ### Response: system user assistant hello world yes no
"""


def build_demo_model(
    directory: Path, *, seed: int = 0, shape: ModelShape = ModelShape(), dtype: str = "float32"
) -> Path:
    """Write the model, its tokenizer and a ChatML chat template to `directory`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=shape.max_position_embeddings,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{**asdict(shape), "vocab_size": shape.vocab_size or len(tokenizer)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(directory)
    return directory
