"""Job configuration: how a request resolves, which requests are refused and where, and the
base-model checks (names, allow-list, local config.json)."""

import json

import pytest
from pydantic import ValidationError

from afina.core.base_models import (
    ModelRefused,
    check_allowed,
    is_hub_id,
    max_length,
    normalise,
    read_local_config,
)
from afina.core.job_config import (
    ConfigRequest,
    JobConfig,
    LoraSettings,
    QuantizationSettings,
    ResolvedHyperparameters,
    fit_to_model,
    resolve_config,
)


def resolve(body: dict, num_examples: int = 100, model_max_length: int | None = None) -> JobConfig:
    return resolve_config(
        ConfigRequest.model_validate(body),
        num_examples=num_examples,
        model_max_length=model_max_length,
    )


def supervised(**hyperparameters: object) -> dict:
    return {"method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}


def only_error(body: dict) -> dict:
    with pytest.raises(ValidationError) as refused:
        ConfigRequest.model_validate(body)
    (error,) = refused.value.errors(include_url=False)
    return error


def test_empty_request_resolves_every_auto_and_default():
    config = resolve({}, num_examples=100)

    assert config.hyperparameters == ResolvedHyperparameters(
        n_epochs=3, batch_size=4, learning_rate_multiplier=1.0
    )
    assert config.training.learning_rate == pytest.approx(2e-4)
    assert config.training.max_seq_length is None
    assert config.training.lr_scheduler == "constant_with_warmup"
    assert config.training.loss_on == "completion"
    assert config.lora == LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    assert config.quantization == QuantizationSettings(bits=4, quant_type="nf4", double_quant=True)


@pytest.mark.parametrize(
    ("num_examples", "batch_size"),
    [(0, 1), (1, 1), (3, 3), (4, 4), (1000, 4)],
)
def test_auto_batch_size_is_at_most_four_and_at_most_the_examples(num_examples, batch_size):
    config = resolve(supervised(batch_size="auto"), num_examples=num_examples)
    assert config.hyperparameters.batch_size == batch_size


@pytest.mark.parametrize(
    "body",
    [
        supervised(n_epochs=5, batch_size=8, learning_rate_multiplier=0.5),
        {"hyperparameters": {"n_epochs": 5, "batch_size": 8, "learning_rate_multiplier": 0.5}},
    ],
    ids=["method.supervised", "legacy top level"],
)
def test_explicit_hyperparameters_pass_through(body):
    config = resolve(body, num_examples=2)

    assert config.hyperparameters == ResolvedHyperparameters(
        n_epochs=5, batch_size=8, learning_rate_multiplier=0.5
    )
    assert config.training.learning_rate == pytest.approx(1e-4)


def test_explicit_settings_pass_through():
    body = {
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "quantization": {"bits": None},
        "training": {"packing": True, "lr_scheduler": "cosine", "max_seq_length": 512},
    }
    config = resolve(body)

    assert config.lora == LoraSettings(
        r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    assert config.quantization.bits is None
    assert config.training.packing is True
    assert config.training.lr_scheduler == "cosine"
    assert config.training.max_seq_length == 512


def test_the_fast_path_is_the_default_and_each_piece_can_be_switched_off():
    """The API cannot know the worker's device: "auto" stays until the worker decides."""
    training = resolve({}).training
    assert training.padding_free is True
    assert training.gradient_checkpointing == "auto"
    assert training.attention == "auto"
    assert training.liger_kernels == "auto"

    off = {"padding_free": False, "gradient_checkpointing": True, "liger_kernels": False}
    training = resolve({"training": {**off, "attention": "eager"}}).training
    assert training.padding_free is False
    assert training.gradient_checkpointing is True
    assert training.liger_kernels is False
    assert training.attention == "eager"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gradient_checkpointing", "yes"),
        ("gradient_checkpointing", "AUTO"),
        ("liger_kernels", 1),
        ("padding_free", "auto"),
        ("attention", "flash_attention_3"),
    ],
)
def test_fast_path_settings_take_only_their_values(field, value):
    error = only_error({"training": {field: value}})
    assert error["loc"] == ("training", field)


def test_learning_rate_overrides_and_sets_the_multiplier_it_implies():
    config = resolve({"training": {"learning_rate": 1e-4}})

    assert config.training.learning_rate == pytest.approx(1e-4)
    assert config.hyperparameters.learning_rate_multiplier == pytest.approx(0.5)


def test_resolved_config_survives_a_round_trip_through_json():
    config = resolve(supervised(n_epochs=2), model_max_length=4096)
    assert JobConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {**supervised(n_epochs=2), "hyperparameters": {"n_epochs": 2}},
            "give hyperparameters in method (method.supervised.hyperparameters or "
            "method.dpo.hyperparameters) or in the legacy top-level hyperparameters, not both",
        ),
        (
            {"method": {}, "hyperparameters": {}},
            "give hyperparameters in method (method.supervised.hyperparameters or "
            "method.dpo.hyperparameters) or in the legacy top-level hyperparameters, not both",
        ),
        (
            {**supervised(learning_rate_multiplier=2), "training": {"learning_rate": 1e-4}},
            "give training.learning_rate or learning_rate_multiplier, not both",
        ),
        (
            {"hyperparameters": {"learning_rate_multiplier": 2}, "training": {"learning_rate": 1}},
            "give training.learning_rate or learning_rate_multiplier, not both",
        ),
    ],
    ids=[
        "method and legacy",
        "empty method and legacy",
        "learning rate and multiplier",
        "learning rate and legacy multiplier",
    ],
)
def test_conflicting_requests_are_refused(body, message):
    error = only_error(body)
    # The error names the field that conflicts with one given before it.
    legacy = "legacy" in message
    assert error["loc"] == (("hyperparameters",) if legacy else ("training", "learning_rate"))
    assert error["msg"] == message


HYPERPARAMETERS = ("method", "supervised", "hyperparameters")


DPO = ("method", "dpo", "hyperparameters")


def nested(loc: tuple[str, ...], value: object) -> dict:
    """`("lora", "r"), 0` -> `{"lora": {"r": 0}}`."""
    *outer, last = loc
    body = {last: value}
    for key in reversed(outer):
        body = {key: body}
    return body


OUT_OF_RANGE = [
    ((*HYPERPARAMETERS, "n_epochs"), 0, "greater_than_equal"),
    ((*HYPERPARAMETERS, "n_epochs"), 101, "less_than_equal"),
    ((*HYPERPARAMETERS, "batch_size"), 0, "greater_than_equal"),
    ((*HYPERPARAMETERS, "learning_rate_multiplier"), 0, "greater_than"),
    (("hyperparameters", "learning_rate_multiplier"), -1, "greater_than"),
    (("lora", "r"), 0, "greater_than_equal"),
    (("lora", "dropout"), 1.0, "less_than"),
    (("lora", "dropout"), -0.1, "greater_than_equal"),
    (("training", "learning_rate"), 0, "greater_than"),
    (("training", "warmup_ratio"), 1, "less_than"),
    (("training", "max_seq_length"), 8, "greater_than_equal"),
    (("training", "gradient_accumulation_steps"), 0, "greater_than_equal"),
    (("training", "lr_scheduler"), "foo", "literal_error"),
    (("quantization", "bits"), 3, "literal_error"),
    (("quantization", "quant_type"), "int4", "literal_error"),
    ((*DPO, "beta"), 0, "greater_than"),
    ((*DPO, "beta"), 101, "less_than_equal"),
    ((*DPO, "n_epochs"), 0, "greater_than_equal"),
    (("method", "type"), "ppo", "literal_error"),
    (("evaluation", "samples"), -1, "greater_than_equal"),
    (("evaluation", "samples"), 257, "less_than_equal"),
    (("evaluation", "max_new_tokens"), 0, "greater_than_equal"),
]


@pytest.mark.parametrize(
    ("loc", "value", "error_type"),
    OUT_OF_RANGE,
    ids=[f"{'.'.join(loc)}={value}" for loc, value, _ in OUT_OF_RANGE],
)
def test_every_range_is_enforced_and_named(loc, value, error_type):
    error = only_error(nested(loc, value))
    assert (error["loc"], error["type"]) == (loc, error_type)


@pytest.mark.parametrize(
    "loc",
    [
        ("epochs",),
        ("lora", "rank"),
        ("training", "lr"),
        ("quantization", "load_in_4bit"),
        (*HYPERPARAMETERS, "epochs"),
        (*DPO, "alpha"),
        ("evaluation", "temperature"),
    ],
    ids=".".join,
)
def test_unknown_keys_are_refused_by_name(loc):
    error = only_error(nested(loc, 3))
    assert (error["loc"], error["type"]) == (loc, "extra_forbidden")


def test_fit_to_model_defaults_max_seq_length_to_2048_or_the_model_limit():
    config = resolve({})

    assert fit_to_model(config, 4096).training.max_seq_length == 2048
    assert fit_to_model(config, 1024).training.max_seq_length == 1024
    assert config.training.max_seq_length is None  # the original is left alone


@pytest.mark.parametrize("asked", [16, 1000, 1024])
def test_fit_to_model_keeps_a_length_within_the_limit(asked):
    config = resolve({"training": {"max_seq_length": asked}})
    assert fit_to_model(config, 1024).training.max_seq_length == asked


def test_fit_to_model_refuses_a_length_over_the_limit():
    config = resolve({"training": {"max_seq_length": 1025}})
    with pytest.raises(
        ValueError, match=r"^max_seq_length 1025 is over the model's limit of 1024 tokens$"
    ):
        fit_to_model(config, 1024)


def test_resolve_config_fits_a_known_model_limit_and_leaves_an_unknown_one():
    assert resolve({}, model_max_length=512).training.max_seq_length == 512
    assert resolve({}, model_max_length=None).training.max_seq_length is None
    with pytest.raises(ValueError, match="over the model's limit of 512 tokens"):
        resolve({"training": {"max_seq_length": 1024}}, model_max_length=512)


@pytest.mark.parametrize(
    ("model", "normalised"),
    [
        ("/models/../etc/passwd", "/etc/passwd"),
        ("/models//llama/./7b/", "/models/llama/7b"),
        ("/models/a/../../../etc", "/etc"),
        ("org/name", "org/name"),
    ],
)
def test_normalise_folds_local_paths_and_keeps_hub_ids(model, normalised):
    assert normalise(model) == normalised


@pytest.mark.parametrize(
    ("model", "patterns"),
    [
        ("/models/x", ["/models/*"]),
        ("/models/x/y", ["/models/*"]),
        ("meta-llama/Llama-3.1-8B", ["mistralai/*", "meta-llama/*"]),
        ("/etc", ["*"]),
        ("anything/at-all", ["*"]),
    ],
)
def test_check_allowed_accepts_a_matching_pattern(model, patterns):
    check_allowed(model, patterns)


@pytest.mark.parametrize(
    ("model", "patterns"),
    [
        (normalise("/models/../etc"), ["/models/*"]),
        ("/models", ["/models/*"]),
        ("Meta-Llama/Llama-3.1-8B", ["meta-llama/*"]),
        ("/models/x", []),
    ],
)
def test_check_allowed_refuses_everything_else(model, patterns):
    permitted = ", ".join(repr(pattern) for pattern in patterns)
    message = f"model {model!r} is not allowed here: AFINA_ALLOWED_MODELS permits {permitted}"
    with pytest.raises(ModelRefused) as refused:
        check_allowed(model, patterns)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("model", "valid"),
    [
        ("org/name", True),
        ("meta-llama/Llama-3.1-8B-Instruct", True),
        ("gpt2", True),
        ("../x", False),
        ("a/b/c", False),
        ("", False),
        ("/models/x", False),
        ("org/", False),
        ("org/na me", False),
        ("org/..", False),
        ("org/.", False),
    ],
)
def test_is_hub_id(model, valid):
    assert is_hub_id(model) is valid


def test_read_local_config_returns_the_json_object(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "n_positions": 64}))
    assert read_local_config(str(tmp_path)) == {"model_type": "llama", "n_positions": 64}


@pytest.mark.parametrize(
    ("config_json", "message"),
    [
        (None, "model {path!r} is not a model directory this service can read"),
        ("{not json", "cannot read the config.json of model {path!r}: Expecting property name"),
        ("[1, 2]", "cannot read the config.json of model {path!r}: it is not a JSON object"),
        (b"\xff\xfe", "cannot read the config.json of model {path!r}: 'utf-8' codec can't"),
    ],
    ids=["no config.json", "invalid JSON", "not an object", "not UTF-8"],
)
def test_read_local_config_refuses_a_directory_without_a_usable_config(
    tmp_path, config_json, message
):
    if isinstance(config_json, bytes):
        (tmp_path / "config.json").write_bytes(config_json)
    elif config_json is not None:
        (tmp_path / "config.json").write_text(config_json)
    with pytest.raises(ModelRefused) as refused:
        read_local_config(str(tmp_path))
    assert str(refused.value).startswith(message.format(path=str(tmp_path)))


def test_read_local_config_refuses_a_missing_directory(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ModelRefused) as refused:
        read_local_config(missing)
    assert str(refused.value) == (
        f"model {missing!r} is not a model directory this service can read "
        "(a directory holding config.json)"
    )


def test_read_local_config_names_the_model_as_sent(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ModelRefused) as refused:
        read_local_config(str(tmp_path), shown="/models/mine")
    assert str(tmp_path) not in str(refused.value)
    assert "'/models/mine'" in str(refused.value)


@pytest.mark.parametrize(
    ("config", "length"),
    [
        ({"max_position_embeddings": 4096}, 4096),
        ({"n_positions": 1024}, 1024),
        ({"max_position_embeddings": 0, "n_positions": 1024}, 1024),
        ({"max_position_embeddings": "4096"}, None),
        ({"text_config": {"max_position_embeddings": 8192}}, 8192),
        ({"text_config": {"max_position_embeddings": 8192}, "max_position_embeddings": 512}, 8192),
        ({"text_config": {}, "n_positions": 512}, 512),
        ({"model_type": "llama"}, None),
    ],
    ids=[
        "max_position_embeddings",
        "n_positions",
        "zero is skipped",
        "a string is not a length",
        "text_config",
        "text_config first",
        "empty text_config",
        "none declared",
    ],
)
def test_max_length_reads_the_declared_context_length(config, length):
    assert max_length(config) == length


def dpo(**hyperparameters: object) -> dict:
    return {"method": {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}}


def test_a_dpo_request_resolves_beta_and_runs_padded_batches_without_liger():
    config = resolve(dpo(n_epochs=2))
    assert config.method == "dpo"
    assert config.hyperparameters.beta == 0.1
    assert config.hyperparameters.n_epochs == 2
    assert (config.training.padding_free, config.training.liger_kernels) == (False, False)
    assert resolve(dpo(beta=0.5, learning_rate_multiplier=0.5)).hyperparameters == (
        ResolvedHyperparameters(n_epochs=3, batch_size=4, learning_rate_multiplier=0.5, beta=0.5)
    )
    assert resolve({"method": {"type": "dpo"}}).hyperparameters.beta == 0.1
    # A supervised job has no beta, and a config stored before DPO existed reads as one.
    assert resolve({}).method == "supervised"
    assert resolve({}).hyperparameters.beta is None
    stored = resolve({}).model_dump(mode="json")
    assert "beta" not in stored["hyperparameters"]
    del stored["method"], stored["evaluation"]
    assert JobConfig.model_validate(stored) == resolve({})


def test_evaluation_defaults_and_settings_show_in_the_resolved_config():
    assert resolve({}).evaluation.model_dump() == {"samples": 16, "max_new_tokens": 256}
    config = resolve({"evaluation": {"samples": 0, "max_new_tokens": 32}})
    assert config.evaluation.model_dump() == {"samples": 0, "max_new_tokens": 32}


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"method": {"type": "supervised", "dpo": {}}}, ("method", "dpo")),
        ({"method": {"dpo": {"hyperparameters": {"beta": 0.2}}}}, ("method", "dpo")),
        ({"method": {"type": "dpo", "supervised": {}}}, ("method", "supervised")),
        ({**dpo(), "training": {"packing": True}}, ("training", "packing")),
        ({**dpo(), "training": {"padding_free": True}}, ("training", "padding_free")),
        ({**dpo(), "training": {"liger_kernels": True}}, ("training", "liger_kernels")),
        (
            {**dpo(learning_rate_multiplier=2), "training": {"learning_rate": 1e-4}},
            ("training", "learning_rate"),
        ),
    ],
    ids=[
        "dpo section, supervised",
        "dpo section, no type",
        "supervised section, dpo",
        "packing",
        "padding_free",
        "liger",
        "dpo learning rate and multiplier",
    ],
)
def test_a_method_section_or_setting_that_does_not_go_with_the_method_is_named(body, loc):
    assert only_error(body)["loc"] == loc
