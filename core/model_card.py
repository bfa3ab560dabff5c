"""The README that goes with a downloaded adapter or a merged export: what it is, the base
model it was trained on, the config it was trained with, and how to load it."""

import json
from typing import Any

ADAPTER_LOADING = """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({base!r})
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```"""

MERGED_LOADING = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

vLLM: `vllm serve path/to/this/folder`. llama.cpp / Ollama: convert this folder with
llama.cpp's `convert_hf_to_gguf.py`."""


def model_card(
    *, name: str, job_id: str, base_model: str, config: dict[str, Any], merged_dtype: str | None
) -> str:
    """`merged_dtype`: the dtype of a merged export; None for an adapter."""
    if merged_dtype is None:
        what = (
            f"The LoRA adapter of `{name}` (peft), with the tokenizer and chat template it "
            "was trained with."
        )
        loading = ADAPTER_LOADING.format(base=base_model)
    else:
        what = (
            f"`{name}` merged into its base model in {merged_dtype} (safetensors), with the "
            "tokenizer and chat template it was trained with."
        )
        loading = MERGED_LOADING
    return (
        f"# {name}\n\n{what}\n\n"
        f"- Base model: `{base_model}`\n"
        f"- Fine-tuning job: `{job_id}` (afina)\n\n"
        f"## Loading\n\n{loading}\n\n"
        f"## The resolved training config\n\n```json\n{json.dumps(config, indent=2)}\n```\n"
    )
