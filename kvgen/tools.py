"""Tool calls: the model's own chat template renders the tools; its reply's calls become OpenAI's.

The call syntax read here is the Hermes one that Qwen2.5's template teaches (and Hermes', and
others'): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call. A
template that renders no tools, or teaches another syntax, is refused rather than guessed at.
With tool_choice "required" or a named function, the reply is constrained to such blocks whose
arguments follow the function's JSON schema (a grammar, `kvgen.grammar`); with "auto" the model
writes freely and whatever it wrote in that syntax is read as calls.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from .grammar import JSON_STYLE, lark_grammar

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_CHOICES = ("none", "auto", "required")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


def check_tools(tools: Any) -> list[dict]:
    """OpenAI's `tools` list, checked; ValueError naming the first thing wrong."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'")
        if name in names:
            raise ValueError(f"tools[{i}].function.name {name!r} is given twice")
        names.add(name)
        if not isinstance(function.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def choose(tools: list[dict] | None, tool_choice: Any) -> tuple[str, list[dict]]:
    """(mode, tools the reply may call): mode "none", "auto" or "required" (a named function is
    "required" of that one function)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ValueError("tool_choice needs tools")
        return "none", []
    tools = check_tools(tools)
    if tool_choice is None:
        return "auto", tools
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function")
        return tool_choice, tools
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(name, str)):
        raise ValueError("tool_choice must be {'type': 'function', 'function': {'name': ...}}")
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    return "required", named


def supports_tools(template: str | None) -> bool:
    """Whether a chat template renders tools and teaches the `<tool_call>` syntax read here."""
    return template is not None and "tools" in template and CALL_OPEN in template


def tag_grammar(tokenizer: Any, tag: str) -> str:
    """How a grammar names `tag`: as its token where the tokenizer has one for it (an added token,
    which the grammar library sees as a special token, not as its text), else as text."""
    ids = [i for i in tokenizer.encode(tag) if i != tokenizer.bos_token_id]
    return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(tag)


def call_grammar(tools: list[dict], tokenizer: Any, parallel: bool = True) -> str:
    """A grammar for one (or, with `parallel`, up to one per tool) `<tool_call>` blocks calling
    `tools`, each call's arguments valid against its function's parameters. ValueError for a schema the grammar
    library cannot enforce."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    body = f'"\\n" %json {json.dumps({**schema, "x-guidance": JSON_STYLE})} "\\n"'
    # A small model, free to add calls, repeats its first one until max_tokens: a forced reply holds
    # at most one call per tool (calling one function twice takes tool_choice "auto").
    more = len(tools) - 1 if parallel else 0
    start = f'start: call ("\\n" call)~0..{more}' if more else "start: call"
    try:  # checked with the tags as text: a token's name needs the tokenizer, which the check lacks
        lark_grammar(f'{start}\ncall: "{CALL_OPEN}" {body} "{CALL_CLOSE}"\n')
    except ValueError as e:
        raise ValueError(f"tools: {e}") from None
    opening, closing = tag_grammar(tokenizer, CALL_OPEN), tag_grammar(tokenizer, CALL_CLOSE)
    return f"{start}\ncall: {opening} {body} {closing}\n"


def parse_calls(text: str, tools: list[dict], parallel: bool = True) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply: OpenAI's `tool_calls` (with ids, arguments as JSON text)
    from its `<tool_call>` blocks, and the text outside them (None when empty). A block that is not
    a call (not JSON, no name) leaves the whole reply as content. A reply that is nothing but such
    a call's JSON, tags left out (small models do that), calls a function among `tools` too."""
    bodies = _BLOCK.findall(text)
    names = {t["function"]["name"] for t in tools}
    if not bodies and text.strip().startswith("{"):
        try:
            bare = json.loads(text)
        except json.JSONDecodeError:
            bare = None
        if isinstance(bare, dict) and bare.get("name") in names and set(bare) <= {"name", "arguments"}:
            bodies, text = [text.strip()], CALL_OPEN + text + CALL_CLOSE
    calls = []
    for body in bodies:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return text, []
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(arguments, dict)):
            return text, []
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(arguments)},
            }
        )
    if not calls:
        return text, []
    content = _BLOCK.sub("", text).strip()
    return content or None, calls if parallel else calls[:1]


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates read them: a call's arguments as an object, not JSON text."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = dict(call.get("function") or {})
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except json.JSONDecodeError:
                        raise ValueError("a tool call's arguments must be JSON text") from None
                calls.append({**call, "function": function})
            m = {**m, "tool_calls": calls, "content": m.get("content") or ""}
        out.append(m)
    return out


def open_prefix(text: str) -> int:
    """Where a `<tool_call>` block starts or may be starting in streamed text (len(text) if nowhere):
    what comes before it can be shown as content, the rest is held until the reply ends. A reply
    that opens with "{" may be a call without its tags (see `parse_calls`): all of it is held."""
    if text.lstrip().startswith("{"):
        return 0
    at = text.find(CALL_OPEN)
    if at >= 0:
        return at
    for keep in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
