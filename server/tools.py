"""Tool calling: tools in the prompt, the grammar of a forced call, and tool calls out of the text.

The format is Hermes-style, which Qwen2.5 / Qwen3 and many fine-tunes use: a call is a JSON object
``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>`` lines, and a
tool's answer goes back between ``<tool_response>`` tags. A model whose chat template renders
tools itself (its template reads ``tools``) gets them through ``apply_chat_template(tools=...)``;
others (the default SmolLM2) get the same format from `render_fallback`: the tool signatures in
the system message, assistant calls as ``<tool_call>`` blocks, tool results as a user turn.

`tool_choice`:
- ``"none"``: the tools are in the prompt, nothing is parsed; ``"auto"`` (the default with
  tools): free text, ``<tool_call>`` blocks in it become ``tool_calls``;
- ``"required"``: a grammar (llguidance Lark with an inline JSON schema) makes the output one call
  (or several with ``parallel_tool_calls``) to one of the tools, its arguments following that
  tool's ``parameters`` schema;
- a named function: the output is that function's arguments, a JSON object of its schema.
Constrained calls go through the engine's grammar masks, so they are exact under speculation too.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from dspark_serve.engine.structured import GrammarSpec

from .errors import APIError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# canonical JSON in forced calls: one space after ':' and ',' (a small model keeps to it best)
_X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_TOOLS = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-.]{1,64}$")


@dataclass
class ToolSet:
    """The request's tools (validated) and what `tool_choice` asks of them."""

    tools: list[dict]  # OpenAI shape: {"type": "function", "function": {"name", "description", "parameters"}}
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None  # the function of a named choice
    parallel: bool = True
    names: list[str] = field(default_factory=list)

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    def function(self, name: str) -> dict:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)


def tool_set(tools: list | None, tool_choice, parallel_tool_calls: bool | None) -> ToolSet | None:
    """Validate `tools` and `tool_choice`; None when the request has no tools. 400s name the field."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    if not tools:
        return None
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"at most {MAX_TOOLS} tools per request", param="tools", code="invalid_value")
    clean, names = [], []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise APIError(400, f"tools.{i} must be {{'type': 'function', 'function': {{...}}}}",
                           param=f"tools.{i}", code="invalid_value")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise APIError(400, f"tools.{i}.function.name must be 1-64 letters, digits, '_', '-' or '.'",
                           param=f"tools.{i}.function.name", code="invalid_value")
        if name in names:
            raise APIError(400, f"tools.{i}: the function name {name!r} is given twice",
                           param=f"tools.{i}.function.name", code="invalid_value")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise APIError(400, f"tools.{i}.function.parameters must be a JSON schema object",
                           param=f"tools.{i}.function.parameters", code="invalid_value")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise APIError(400, f"tools.{i}.function.description must be a string",
                           param=f"tools.{i}.function.description", code="invalid_value")
        entry = {"name": name, "parameters": params}
        if desc:
            entry["description"] = desc
        clean.append({"type": "function", "function": entry})
        names.append(name)
    choice, named = "auto", None
    if tool_choice is None or tool_choice == "auto":
        pass
    elif tool_choice in ("none", "required"):
        choice = tool_choice
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        named = tool_choice["function"].get("name")
        if named not in names:
            raise APIError(400, f"tool_choice names the function {named!r}, which is not among the tools "
                                f"({', '.join(names)})", param="tool_choice", code="invalid_value")
        choice = "named"
    else:
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                            "{'type': 'function', 'function': {'name': ...}}", param="tool_choice", code="invalid_value")
    return ToolSet(clean, choice, named, parallel_tool_calls is not False, names)


def grammar(ts: ToolSet) -> GrammarSpec | None:
    """The constraint of a forced call (required or named); None for none / auto."""
    if ts.choice == "named":
        schema = dict(ts.function(ts.named)["parameters"])
        schema.setdefault("type", "object")
        return GrammarSpec.json_schema({**schema, "x-guidance": _X_GUIDANCE}, param="tools")
    if ts.choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                "arguments": t["function"]["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for t in ts.tools]
    schema = {"anyOf": calls, "x-guidance": _X_GUIDANCE}
    more = ' ("\\n" call)*' if ts.parallel else ""
    text = (f"start: call{more}\n"
            f'call: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"\n'
            f"body: %json {json.dumps(schema, ensure_ascii=False)}\n")
    return GrammarSpec.grammar(text, param="tools")


def template_renders_tools(tokenizer, template: str | None = None) -> bool:
    """Whether the chat template (`template`, else the tokenizer's) reads `tools`."""
    template = template or getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def _tool_prompt(ts: ToolSet) -> str:
    sigs = "\n".join(json.dumps(t, ensure_ascii=False) for t in ts.tools)
    return ("You can call functions to help with the user's request. The functions, as JSON signatures, "
            f"are listed between <tools> and </tools>:\n<tools>\n{sigs}\n</tools>\n"
            "To call a function, answer with a JSON object holding its name and its arguments between "
            f"{CALL_OPEN} and {CALL_CLOSE} tags, one call per block:\n"
            f'{CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n{CALL_CLOSE}')


def _call_text(call: dict) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments", "{}")
    try:
        args_obj = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        args_obj = args  # kept as the string the client sent
    return f"{CALL_OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': args_obj}, ensure_ascii=False)}\n{CALL_CLOSE}"


def render_fallback(messages: list[dict], ts: ToolSet | None) -> list[dict]:
    """Messages with tools, assistant tool calls and tool results rewritten as plain turns, for a
    chat template that knows only system / user / assistant with string content."""
    out: list[dict] = []
    if ts is not None:
        prompt = _tool_prompt(ts)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = "\n".join(_call_text(c) for c in m["tool_calls"])
            content = f"{m['content']}\n{text}" if m.get("content") else text
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool", None)
    return out


def call_id(request_id: str, index: int) -> str:
    """A tool call's id: stable for one response (the streamed and the whole answer agree)."""
    return "call_" + hashlib.sha256(f"{request_id}/{index}".encode()).hexdigest()[:24]


def parse(text: str, ts: ToolSet, request_id: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished output. Named choice: the whole text is the arguments.
    Otherwise every well-formed <tool_call> block whose name is one of the tools becomes a call and
    the text before the first block is the content; a malformed block stays in the content."""
    if ts.choice == "named":
        return None, [_call(request_id, 0, ts.named, text)]
    calls, first = [], None
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("name") not in ts.names:
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append(_call(request_id, len(calls), obj["name"], json.dumps(args, ensure_ascii=False)))
        first = m.start() if first is None else first
    if not calls:
        return text, []
    content = text[:first].strip()
    return content or None, calls


def _call(request_id: str, index: int, name: str, arguments: str) -> dict:
    return {"id": call_id(request_id, index), "type": "function", "function": {"name": name, "arguments": arguments}}


class StreamParser:
    """Turns streamed text deltas into chat deltas: content, and tool calls in OpenAI's chunk shape
    (the first delta of a call carries its index, id, type and name with empty arguments, the next
    ones argument text). Text that may be the start of a <tool_call> tag is held back until it is
    known not to be. Named choice: every delta is argument text of call 0."""

    def __init__(self, ts: ToolSet, request_id: str):
        self.ts = ts
        self.request_id = request_id
        self._buf = ""
        self._calls = 0
        self._content_sent = False
        if ts.choice == "named":
            self._named_started = False

    def feed(self, delta: str, final: bool = False) -> list[dict]:
        """The chat deltas for `delta` (`final`: the output ended; flush what is held back)."""
        if self.ts.choice == "named":
            return self._feed_named(delta)
        self._buf += delta
        out: list[dict] = []
        while True:
            start = self._buf.find(CALL_OPEN)
            if start < 0:
                keep = 0 if final else partial_suffix(self._buf, CALL_OPEN)
                text = self._buf[:len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                if text:
                    out.append(self._content(text))
                return out
            if start > 0:
                out.append(self._content(self._buf[:start]))
                self._buf = self._buf[start:]
            end = self._buf.find(CALL_CLOSE)
            if end < 0:
                if final:  # an unfinished call: its text is content, as `parse` leaves it
                    out.append(self._content(self._buf))
                    self._buf = ""
                return out
            block = self._buf[:end + len(CALL_CLOSE)]
            self._buf = self._buf[end + len(CALL_CLOSE):]
            call = _parse_block(block, self.ts)
            if call is None:
                out.append(self._content(block))
                continue
            name, args = call
            i = self._calls
            self._calls += 1
            out.append({"tool_calls": [{"index": i, "id": call_id(self.request_id, i), "type": "function",
                                        "function": {"name": name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": i, "function": {"arguments": args}}]})
            self._buf = self._buf.lstrip("\n") if self._calls else self._buf

    def _content(self, text: str) -> dict:
        if self._calls:  # text after a call: the non-streamed answer drops it from the content too
            return {}
        return {"content": text}

    def _feed_named(self, delta: str) -> list[dict]:
        out = []
        if not self._named_started:
            self._named_started = True
            out.append({"tool_calls": [{"index": 0, "id": call_id(self.request_id, 0), "type": "function",
                                        "function": {"name": self.ts.named, "arguments": ""}}]})
        if delta:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
        return out

    @property
    def num_calls(self) -> int:
        return 1 if self.ts.choice == "named" else self._calls


def _parse_block(block: str, ts: ToolSet) -> tuple[str, str] | None:
    m = _CALL_RE.fullmatch(block.strip())
    if m is None:
        return None
    try:
        obj = json.loads(m.group(1))
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in ts.names:
        return None
    return obj["name"], json.dumps(obj.get("arguments", obj.get("parameters", {})), ensure_ascii=False)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
