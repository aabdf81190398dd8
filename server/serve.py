"""`dspark serve`: settings from flags, DSPARK_* variables and a YAML file, then uvicorn.

Precedence: command line > environment (DSPARK_<FLAG>, e.g. DSPARK_MAX_NUM_SEQS)
> YAML (`--config`, keys are flag names with dashes or underscores) > defaults.
To know which flags were typed, every serve option defaults to
argparse.SUPPRESS: only typed flags appear in the parsed namespace, and the
real defaults are kept aside for the last layer.

SIGTERM / SIGINT start a drain (see lifecycle.py) instead of uvicorn's
immediate stop; a second signal stops at once. If the engine thread dies, the
server lets the in-flight requests receive their errors and exits with status 1,
so that a supervisor (Kubernetes) restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import prometheus_client
import uvicorn

from .cli import add_engine_args, engine_config_from_args, parse_bytes

log = logging.getLogger("dspark.serve")

ENV_PREFIX = "DSPARK_"
_LOG_LEVELS = ["debug", "info", "warning", "error"]


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve a model over the OpenAI API. Every flag can also be set as DSPARK_<FLAG> "
                    "(e.g. DSPARK_PORT) or as a key of the --config YAML file; "
                    "precedence: command line > environment > YAML > defaults.",
    )
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--config", default=None, help="YAML file of settings (keys: flag names)")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="(default 8000)")
    g.add_argument("--served-model-name", default=None, help="model name in the API (default: the model's name)")
    g.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (not on /health, /metrics)")
    g.add_argument("--max-waiting", type=int, default=None,
                   help="most requests waiting for admission before 429 (default: 4 x max-num-seqs)")
    g.add_argument("--shutdown-grace-period", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    g.add_argument("--max-request-body-size", type=parse_bytes, default=8 << 20,
                   help="largest request body accepted, bytes or with a unit (default 8MiB); larger is 413")
    lim = p.add_argument_group("request limits")
    lim.add_argument("--max-prompt-tokens", type=int, default=None,
                     help="longest prompt accepted, in tokens (default: the context length); longer is 400")
    lim.add_argument("--max-output-tokens", type=int, default=None,
                     help="largest max_tokens accepted, and the default when a request sets none "
                          "(default: the context length); larger is 400")
    lim.add_argument("--max-n", type=int, default=8, help="most choices (n) per request, at most 8 (default 8)")
    lim.add_argument("--request-timeout", type=float, default=None,
                     help="seconds a request may run before it is stopped with a 504 or a final stream error "
                          "(default: no limit)")
    g.add_argument("--chat-template", default=None,
                   help="a chat template (Jinja) file, or the template itself, instead of the model's")
    g.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"],
                   help="move the model's <think>...</think> into reasoning_content (default: off)")
    g.add_argument("--generation-config", default="auto", choices=["auto", "vllm"],
                   help="auto: the model's generation_config.json sampling defaults apply where a request "
                        "sets none; vllm: ours (temperature 1, top_p 1, ...)")
    lim.add_argument("--allowed-origins", default=None,
                     help="comma-separated origins allowed by CORS, or * (default: CORS off)")
    # Own dest: the top-level parser has a --log-level too, whose default would hide env/YAML values.
    g.add_argument("--log-level", dest="serve_log_level", default=None, choices=_LOG_LEVELS, help="(default info)")
    p.set_defaults(func=cmd_serve, serve_parser=p)
    _defer_defaults(p)
    return p


def _defer_defaults(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(serve_defaults={a.dest: a.default for a in _options(parser).values()})
    for action in _options(parser).values():
        action.default = argparse.SUPPRESS


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _setting_name(action: argparse.Action) -> str:
    """--max-num-seqs -> max_num_seqs (the YAML key; the env variable is DSPARK_ + its upper case)."""
    flag = max((o for o in action.option_strings if not o.startswith("--no-")), key=len)
    return flag.lstrip("-").replace("-", "_")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(value: Any) -> bool:
    """An on/off flag's value from the environment ("true", "0"...) or YAML (a boolean)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, source: str) -> Any:
    """A value from the environment (always a string) or YAML (typed) -> what the flag would give."""
    if value is None:
        return None
    try:
        if isinstance(action, argparse.BooleanOptionalAction):
            return _parse_bool(value)
        if action.type in (int, float) and not isinstance(value, str):
            # YAML already typed it: refuse `port: yes` or `max-num-seqs: 2.5` rather than coerce.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    action.type is int and value != int(value)):
                raise ValueError(f"expected {'an integer' if action.type is int else 'a number'}")
        if action.type is not None:
            value = action.type(value)  # parse_bytes / parse_json_dict also accept typed values
        elif not isinstance(value, str):
            value = str(value)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        parser.error(f"{source}: invalid value {value!r}: {e}")
    if action.choices is not None and value not in action.choices:
        parser.error(f"{source}: {value!r} is not one of {list(action.choices)}")
    return value


def _load_yaml(parser: argparse.ArgumentParser, path: str, names: set[str]) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read config {path}: {e}")
    if not isinstance(data, dict):
        parser.error(f"config {path}: expected a mapping of setting names to values")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names or name == "config":
            parser.error(f"config {path}: unknown setting {key!r}")
        out[name] = value
    return out


def resolve_serve_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Merge the four layers into a namespace with every serve option set."""
    environ = os.environ if environ is None else environ
    parser: argparse.ArgumentParser = args.serve_parser
    defaults: dict[str, Any] = args.serve_defaults
    actions = _options(parser)
    by_name = {_setting_name(a): a for a in actions.values()}

    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    from_yaml = _load_yaml(parser, config_path, set(by_name)) if config_path else {}

    merged = vars(args).copy()
    for name, action in by_name.items():
        env_key = ENV_PREFIX + name.upper()
        if hasattr(args, action.dest):
            continue  # typed on the command line
        if env_key in environ:
            merged[action.dest] = _convert(parser, action, environ[env_key], f"${env_key}")
        elif name in from_yaml:
            merged[action.dest] = _convert(parser, action, from_yaml[name], f"{config_path}: {name}")
        else:
            merged[action.dest] = defaults[action.dest]
    merged["config"] = config_path
    # The serve-level --log-level (from any layer) wins over `dspark --log-level X serve`, which
    # argparse always fills in (default "info") and so can only act as the default here.
    merged["log_level"] = merged.pop("serve_log_level", None) or getattr(args, "log_level", None) or "info"
    return argparse.Namespace(**merged)


def server_settings_from_args(args: argparse.Namespace):
    from .app import ServerSettings

    return ServerSettings(
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_request_body_size=args.max_request_body_size,
        shutdown_grace_period=args.shutdown_grace_period,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        max_n=args.max_n,
        request_timeout=args.request_timeout,
        allowed_origins=[o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()],
        chat_template=_read_template(args.chat_template),
        reasoning_parser=args.reasoning_parser,
        generation_config=args.generation_config,
    )


def _read_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the value itself when it names no file."""
    if value is None:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:
        pass
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    args = resolve_serve_args(args)
    logging.getLogger().setLevel(args.log_level.upper())
    # No `*_created` series: they double the exposition and no dashboard uses them (process-wide switch).
    prometheus_client.disable_created_metrics()
    from dspark_serve.engine import AsyncEngine

    from .app import create_app

    shown = {k: v for k, v in vars(args).items() if k not in ("func", "serve_parser", "serve_defaults")}
    if shown.get("api_key"):
        shown["api_key"] = "***"
    log.info("settings: %s", shown)
    try:
        engine = AsyncEngine(engine_config_from_args(args), max_waiting=args.max_waiting)
    except Exception as e:  # a bad model or drafter path, a mismatched drafter, no memory for the KV cache...
        log.debug("start-up failure", exc_info=True)
        reason = (str(e).strip().splitlines() or [""])[0]
        print(f"dspark serve: error: cannot start: {type(e).__name__}: {reason}", file=sys.stderr)
        return 1
    try:
        app = create_app(engine, server_settings_from_args(args))
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_config=None, log_level=args.log_level,
            access_log=False,  # dspark.access writes one line per request instead
            lifespan="off", timeout_graceful_shutdown=5,
        )
        server = DrainingServer(config, app.state.lifecycle, engine)
        log.info("serving %s on http://%s:%d", app.state.settings.served_model_name or engine.model_name,
                 args.host, args.port)
        server.run()
        return 0 if server.started and not engine.dead else 1
    finally:
        engine.shutdown()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains before exiting; a second one stops at once.
    It also stops when the engine thread has died (`engine.dead`)."""

    def __init__(self, config: uvicorn.Config, lifecycle, engine) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_started = False
        self._drain_task: asyncio.Future | None = None
        self._death_task: asyncio.Future | None = None

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop calls this every 0.1 s.
        if self.engine.dead and self._death_task is None:
            log.critical("the engine thread has died: exiting with status 1 once the in-flight "
                         "requests have their errors")
            self._death_task = asyncio.ensure_future(self._exit_after_death())
        return await super().on_tick(counter)

    async def _exit_after_death(self) -> None:
        try:
            await self.lifecycle.settle()  # meanwhile /health and new requests get 503
        finally:
            self.should_exit = True

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Runs in the signal handler, on the loop's thread but between two of its callbacks:
        # hand the work to the loop rather than doing it here. Not calling super() also means
        # uvicorn does not re-raise the signal at exit, so a drained server exits with status 0.
        if self._loop is None or not self.started:
            self.should_exit = True  # not serving yet: stop as uvicorn would
        elif self._drain_started:
            log.warning("second signal: stopping now")
            self.should_exit = self.force_exit = True
        else:
            self._drain_started = True
            log.info("signal %s: draining (grace period %.1fs)", sig, self.lifecycle.grace_period)
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.lifecycle.drain()
        finally:
            self.should_exit = True  # uvicorn's main loop notices within 0.1 s
