"""`dspark serve` settings: command line > DSPARK_* environment > YAML --config > defaults."""

from __future__ import annotations

import json

import pytest

from dspark_serve.server.cli import build_parser, engine_config_from_args
from dspark_serve.server.serve import resolve_serve_args


def resolve(argv: list[str], env: dict[str, str] | None = None, top: list[str] | None = None):
    args = build_parser().parse_args([*(top or []), "serve", *argv])
    return resolve_serve_args(args, env or {})


def test_defaults_serve_the_embedded_model_on_localhost_8000():
    a = resolve([])
    assert (a.host, a.port) == ("127.0.0.1", 8000)
    assert a.model is None  # the embedded SmolLM2-135M-Instruct
    assert a.api_key is None and a.served_model_name is None
    assert a.max_request_body_size == 8 << 20
    assert a.shutdown_grace_period == 30.0
    assert a.max_waiting is None
    assert a.log_level == "info"
    assert a.config is None


def test_each_layer_overrides_the_one_below(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 1111\nmax-num-seqs: 3\nhost: 0.0.0.0\napi_key: from-yaml\n")
    a = resolve(["--config", str(cfg)])
    assert (a.port, a.max_num_seqs, a.host, a.api_key) == (1111, 3, "0.0.0.0", "from-yaml")
    a = resolve(["--config", str(cfg)], env={"DSPARK_PORT": "2222", "DSPARK_API_KEY": "from-env"})
    assert (a.port, a.max_num_seqs, a.api_key) == (2222, 3, "from-env")
    a = resolve(["--config", str(cfg), "--port", "3333"], env={"DSPARK_PORT": "2222"})
    assert (a.port, a.max_num_seqs, a.host) == (3333, 3, "0.0.0.0")


def test_values_are_converted_like_flags(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "kv_cache_memory: 512MiB\n"
        "speculative-config: {method: dspark, num_speculative_tokens: 4}\n"
        "shutdown-grace-period: 2\n"
        "max-model-len: 1024\n"
    )
    a = resolve(["--config", str(cfg)], env={"DSPARK_MAX_WAITING": "7", "DSPARK_MAX_REQUEST_BODY_SIZE": "1MiB"})
    assert a.kv_cache_memory == 512 << 20
    assert a.speculative_config == {"method": "dspark", "num_speculative_tokens": 4}
    assert a.shutdown_grace_period == 2.0 and isinstance(a.shutdown_grace_period, float)
    assert a.max_waiting == 7 and a.max_request_body_size == 1 << 20
    cfg_engine = engine_config_from_args(a)
    assert (cfg_engine.kv_cache_memory, cfg_engine.max_model_len) == (512 << 20, 1024)
    assert cfg_engine.speculative_config["num_speculative_tokens"] == 4
    a = resolve(["--speculative-config", '{"method": "dspark"}', "--kv-cache-memory", "2GiB"],
                env={"DSPARK_SPECULATIVE_CONFIG": '{"method": "other"}'})
    assert a.speculative_config == {"method": "dspark"} and a.kv_cache_memory == 2 << 30


def test_prefix_caching_is_on_by_default_and_off_from_any_layer(tmp_path):
    assert resolve([]).enable_prefix_caching is True
    assert engine_config_from_args(resolve([])).enable_prefix_caching is True
    assert resolve(["--no-enable-prefix-caching"]).enable_prefix_caching is False
    assert resolve([], env={"DSPARK_ENABLE_PREFIX_CACHING": "false"}).enable_prefix_caching is False
    assert resolve([], env={"DSPARK_ENABLE_PREFIX_CACHING": "1"}).enable_prefix_caching is True
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("enable-prefix-caching: false\n")
    a = resolve(["--config", str(cfg)])
    assert a.enable_prefix_caching is False and engine_config_from_args(a).enable_prefix_caching is False
    assert resolve(["--config", str(cfg), "--enable-prefix-caching"]).enable_prefix_caching is True


def test_config_file_can_come_from_the_environment(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("served-model-name: my-model\n")
    assert resolve([], env={"DSPARK_CONFIG": str(cfg)}).served_model_name == "my-model"


def test_log_level_from_any_layer():
    assert resolve([], env={"DSPARK_LOG_LEVEL": "debug"}).log_level == "debug"
    assert resolve(["--log-level", "error"], env={"DSPARK_LOG_LEVEL": "debug"}).log_level == "error"
    assert resolve([], top=["--log-level", "warning"]).log_level == "warning"


@pytest.mark.parametrize("yaml_text, env", [
    ("no_such_setting: 1\n", {}),
    ("port: not-a-number\n", {}),
    ("port: true\n", {}),
    ("max-num-seqs: 2.5\n", {}),
    ("log-level: loud\n", {}),
    ("- a list\n", {}),
    ("", {"DSPARK_PORT": "eighty"}),
    ("", {"DSPARK_KV_CACHE_MEMORY": "lots"}),
    ("", {"DSPARK_SPECULATIVE_CONFIG": "[1]"}),
    ("", {"DSPARK_ENABLE_PREFIX_CACHING": "maybe"}),
    ("enable-prefix-caching: 3\n", {}),
])
def test_bad_settings_exit_with_a_message(tmp_path, capsys, yaml_text, env):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(SystemExit) as e:
        resolve(["--config", str(cfg)], env=env)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_missing_config_file_exits(tmp_path):
    with pytest.raises(SystemExit):
        resolve(["--config", str(tmp_path / "absent.yaml")])


def test_profile_writes_the_cost_table_the_engine_plans_with(tmp_path, tiny_llama_dir, tiny_drafter_dir, capsys):
    """`dspark profile` builds SPS(B) offline through the engine's public interface and saves it
    where `--cost-table` says; a second run loads it instead of profiling again."""
    from dspark_serve.server.cli import main

    out = tmp_path / "table.json"
    args = ["profile", "--model", tiny_llama_dir, "--dtype", "float32", "--enforce-eager", "--num-threads", "1",
            "--speculative-config", json.dumps({"method": "dspark", "model": tiny_drafter_dir}),
            "--cost-table", str(out)]
    assert main(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("B=")]
    saved = json.loads(out.read_text())
    assert lines and len(lines) == len(saved["points"])
    stamp = out.stat().st_mtime_ns
    assert main(args) == 0 and out.stat().st_mtime_ns == stamp  # loaded, not re-profiled
    assert main(["profile", "--model", tiny_llama_dir, "--enforce-eager"]) == 2  # no drafter: nothing to profile
