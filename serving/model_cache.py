"""The models the engine holds: base models, least recently used first out beyond
AFINA_MAX_LOADED_BASE_MODELS, and the adapters on them, least recently used first out
beyond AFINA_MAX_LOADED_ADAPTERS (counted across all bases). Adapter hits, misses and
evictions are counted (`serving.metrics`).

All of a base's adapters are loaded into one peft model under their own names, so one
forward pass can apply a different adapter to each row of a batch (`adapter_names`).
Used from the engine thread only.
"""

import gc
import itertools
import logging
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model

from afina.core.base_models import max_length
from afina.core.chat_format import Stops, end_of_turn, eos_ids
from afina.core.model_loading import ModelLoadError, load_base_model, load_tokenizer
from afina.core.storage import ArtifactStorage
from afina.serving import metrics
from afina.serving.protocol import AdapterSpec, BaseModelSpec, InferenceError

logger = logging.getLogger(__name__)

NO_ADAPTER = "__base__"  # peft's name for "no adapter on this row"


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer and where generation with it stops."""

    tokenizer: Any
    eos: frozenset[int]
    end_of_turn: Stops

    @classmethod
    def of(cls, model: Any, tokenizer: Any) -> "Vocabulary":
        return cls(tokenizer, eos_ids(model, tokenizer), end_of_turn(tokenizer))


@dataclass
class LoadedBase:
    spec: BaseModelSpec
    model: Any  # the transformers model, wrapped in a PeftModel while it has adapters
    vocabulary: Vocabulary
    context_length: int | None

    @property
    def takes_adapter_names(self) -> bool:
        return isinstance(self.model, PeftModel)


def _model_error(error: Exception) -> InferenceError:
    if isinstance(error, torch.OutOfMemoryError):
        return InferenceError(503, "not enough GPU memory to load the model", code="out_of_memory")
    return InferenceError(409, str(error), code="model_load_failed")


class ModelCache:
    """The loaded bases and adapters, least recently used unloaded first. Its errors name no
    request field: the batch names the one that chose the model (`ModelSpec.param`)."""

    def __init__(
        self,
        *,
        storage: ArtifactStorage,
        cache_dir: Path,
        max_bases: int,
        max_adapters: int,
        trust_remote_code: bool,
    ) -> None:
        self._storage = storage
        self._cache_dir = cache_dir
        self._max_bases = max_bases
        self._max_adapters = max_adapters
        self._trust_remote_code = trust_remote_code
        self._bases: OrderedDict[tuple[str, str], LoadedBase] = OrderedDict()
        # (base key, adapter key) -> (the adapter's name in the base's peft model, vocabulary)
        self._adapters: OrderedDict[tuple[tuple[str, str], str], tuple[str, Vocabulary]] = (
            OrderedDict()
        )
        self._names = (f"adapter_{n}" for n in itertools.count())

    @property
    def loaded_adapters(self) -> tuple[str, ...]:
        """The adapters' storage keys, least recently used first."""
        return tuple(key for _, key in self._adapters)

    def base(self, spec: BaseModelSpec) -> LoadedBase:
        loaded = self._bases.get(spec.key)
        if loaded is not None:
            self._bases.move_to_end(spec.key)
            return loaded
        while len(self._bases) >= self._max_bases:
            evicted = next(iter(self._bases))
            metrics.ADAPTER_CACHE_EVICTIONS.inc(sum(key == evicted for key, _ in self._adapters))
            self._unload_base(evicted)
        try:
            model = load_base_model(
                spec.model,
                quantization=spec.quantization,
                trust_remote_code=self._trust_remote_code,
            )
            tokenizer = load_tokenizer(spec.model, trust_remote_code=self._trust_remote_code)
        except (ModelLoadError, torch.OutOfMemoryError) as error:
            raise _model_error(error) from error
        model.eval()
        loaded = LoadedBase(
            spec, model, Vocabulary.of(model, tokenizer), max_length(model.config.to_dict())
        )
        self._bases[spec.key] = loaded
        logger.info("loaded base model %s", spec.model)
        return loaded

    def adapter(self, base: LoadedBase, spec: AdapterSpec) -> tuple[str, Vocabulary]:
        """The adapter's name in the base's peft model, and its vocabulary (the tokenizer
        saved with it, so chat uses the template it was trained with)."""
        entry = (base.spec.key, spec.key)
        if entry in self._adapters:
            metrics.ADAPTER_CACHE_HITS.inc()
            self._adapters.move_to_end(entry)
            return self._adapters[entry]
        metrics.ADAPTER_CACHE_MISSES.inc()
        while len(self._adapters) >= self._max_adapters:
            metrics.ADAPTER_CACHE_EVICTIONS.inc()
            self._unload_adapter(*next(iter(self._adapters)))
        directory = self._fetch(spec)
        name = next(self._names)
        try:
            if not base.takes_adapter_names:
                # Wrapped before the weights load (what PeftModel.from_pretrained does in one
                # go), so that a failed load leaves a peft model to unwrap, not stray layers.
                config = PeftConfig.from_pretrained(str(directory))
                config.inference_mode = True
                base.model = get_peft_model(base.model, config, adapter_name=name)
            base.model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
            vocabulary = base.vocabulary
            if (directory / "tokenizer_config.json").is_file():
                tokenizer = load_tokenizer(str(directory), trust_remote_code=False)
                vocabulary = Vocabulary.of(base.model, tokenizer)
        except Exception as error:
            if base.takes_adapter_names and name in base.model.peft_config:
                self._remove_from_model(base, name)
            if isinstance(error, torch.OutOfMemoryError):
                raise _model_error(error) from error
            logger.exception("cannot load the adapter %s", spec.key)
            raise InferenceError(
                500,
                f"the adapter files of {spec.name!r} cannot be loaded; the server log says why",
                code="adapter_load_failed",
            ) from error
        self._adapters[entry] = (name, vocabulary)
        logger.info("loaded adapter %s on %s", spec.key, base.spec.model)
        return name, vocabulary

    def forget(self, folder: str) -> None:
        """Unload every adapter stored under `folder`, and drop their local copies."""
        for base_key, adapter_key in list(self._adapters):
            if adapter_key.startswith(f"{folder}/"):
                self._unload_adapter(base_key, adapter_key)
        shutil.rmtree(self._cache_dir / folder, ignore_errors=True)

    def close(self) -> None:
        for key in list(self._bases):
            self._unload_base(key)

    def _fetch(self, spec: AdapterSpec) -> Path:
        try:
            directory = self._storage.local_directory(spec.key, self._cache_dir)
        except FileNotFoundError:
            directory = None
        if directory is None or not (directory / "adapter_config.json").is_file():
            raise InferenceError(
                404,
                f"the adapter files of {spec.name!r} are missing from storage",
                code="adapter_not_found",
            )
        return directory

    def _unload_adapter(self, base_key: tuple[str, str], adapter_key: str) -> None:
        name, _ = self._adapters.pop((base_key, adapter_key))
        self._remove_from_model(self._bases[base_key], name)
        logger.info("unloaded adapter %s", adapter_key)

    def _remove_from_model(self, base: LoadedBase, name: str) -> None:
        """Take an adapter out of the base's peft model; the last one unwraps the model, as
        peft would keep naming a deleted last adapter active."""
        if len(base.model.peft_config) > 1:
            with warnings.catch_warnings():  # "adapter ... was active": no adapter is active
                warnings.simplefilter("ignore")
                base.model.delete_adapter(name)
        else:
            base.model = base.model.unload()

    def _unload_base(self, key: tuple[str, str]) -> None:
        base = self._bases[key]
        for base_key, adapter_key in list(self._adapters):
            if base_key == key:
                self._unload_adapter(key, adapter_key)
        del self._bases[key]
        base.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("unloaded base model %s", key[0])
