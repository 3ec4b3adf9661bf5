"""Tool use in prompts: the text that lists the tools (put after the system prompt) and the text of
an assistant's function call, in each tool format a template can name; and, for serving, the calls
read back out of a generated answer (:func:`extract_calls`).

Formats: ``lf-0.5`` (LLaMA-Factory 0.5's only one), and LLaMA-Factory 0.9's ``default``, ``llama3``,
``qwen``, ``mistral`` and ``glm4``. Tools arrive as the dataset's JSON text (a list of function
schemas, bare or wrapped as ``{"type": "function", "function": ...}``); a function call as the JSON
text of one call ``{"name": ..., "arguments": ...}`` or a list of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime

from chipspan.errors import ChipspanError

_LF05_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format to answer the question:\n"
    "```\n"
    "Action: the action to take, should be one of [{tool_names}] if using a tool.\n"
    "Action Input: the input to the action"
    ', in a JSON format representing the kwargs (e.g. ```{{"input": "hello world", "num_beams": 5}}```).\n'
    "```\n"
)
_DEFAULT_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n'
    "```\n"
)
_GLM4_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)
_LLAMA3_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tool_text}"
)
_QWEN_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)


def today() -> str:
    """The date the ``llama3`` tool prompt states, e.g. ``07 Mar 2025`` (tests replace this function)."""
    return datetime.now().strftime("%d %b %Y")


def _dumps(value: object, **kwargs) -> str:
    return json.dumps(value, ensure_ascii=False, **kwargs)


def _unwrap(tool: dict) -> dict:
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrap(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _args_text(tool: dict, with_items: bool) -> str:
    """One line per parameter: ``  - name (type, required): description, should be one of [...]``."""
    lines = ""
    for name, param in tool["parameters"]["properties"].items():
        required = ", required" if name in tool["parameters"].get("required", []) else ""
        enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum") else ""
        items = ""
        if with_items and param.get("items"):
            items = ", where each item should be {}".format(param["items"].get("type", ""))
        kind, description = param.get("type", ""), param.get("description", "")
        lines += f"  - {name} ({kind}{required}): {description}{enum}{items}\n"
    return lines


def _action_list(tools: list[dict], prompt: str, with_items: bool) -> str:
    tool_text = ""
    for tool in tools:
        args = _args_text(tool, with_items)
        description = tool.get("description", "")
        tool_text += f"> Tool Name: {tool['name']}\nTool Description: {description}\nTool Args:\n{args}\n"
    return prompt.format(tool_text=tool_text, tool_names=", ".join(tool["name"] for tool in tools))


def _lf05_tools(tools: list[dict]) -> str:
    return _action_list(tools, _LF05_PROMPT, with_items=False)


def _default_tools(tools: list[dict]) -> str:
    return _action_list([_unwrap(t) for t in tools], _DEFAULT_PROMPT, with_items=True)


def _glm4_tools(tools: list[dict]) -> str:
    tool_text = ""
    for tool in map(_unwrap, tools):
        body = _dumps(tool, indent=4)
        tool_text += f"\n\n## {tool['name']}\n\n{body}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    return _GLM4_PROMPT.format(tool_text=tool_text)


def _llama3_tools(tools: list[dict]) -> str:
    tool_text = "".join(_dumps(_wrap(tool), indent=4) + "\n\n" for tool in tools)
    return _LLAMA3_PROMPT.format(date=today(), tool_text=tool_text)


def _qwen_tools(tools: list[dict]) -> str:
    return _QWEN_PROMPT.format(tool_text="".join("\n" + _dumps(_wrap(tool)) for tool in tools))


def _mistral_tools(tools: list[dict]) -> str:
    return "[AVAILABLE_TOOLS] " + _dumps([_wrap(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"


Call = tuple[str, str]  # (function name, arguments as JSON text)


def _default_calls(calls: list[Call]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)


def _glm4_calls(calls: list[Call]) -> str:
    if len(calls) > 1:
        raise ChipspanError("tool format glm4 has no parallel function calls: use one call per message")
    return f"{calls[0][0]}\n{calls[0][1]}"


def _llama3_calls(calls: list[Call]) -> str:
    objects = [{"name": name, "parameters": json.loads(arguments)} for name, arguments in calls]
    return _dumps(objects[0] if len(objects) == 1 else objects)


def _mistral_calls(calls: list[Call]) -> str:
    return _dumps([{"name": name, "arguments": json.loads(arguments)} for name, arguments in calls])


def _qwen_calls(calls: list[Call]) -> str:
    texts = (_dumps({"name": name, "arguments": json.loads(arguments)}) for name, arguments in calls)
    return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in texts)


# LLaMA-Factory 0.5's only format, then LLaMA-Factory 0.9's.
_TOOLS: dict[str, Callable[[list[dict]], str]] = {
    "lf-0.5": _lf05_tools,
    "default": _default_tools,
    "llama3": _llama3_tools,
    "qwen": _qwen_tools,
    "mistral": _mistral_tools,
    "glm4": _glm4_tools,
}
_CALLS: dict[str, Callable[[list[Call]], str]] = {
    "default": _default_calls,
    "llama3": _llama3_calls,
    "qwen": _qwen_calls,
    "mistral": _mistral_calls,
    "glm4": _glm4_calls,
}


def tools_text(tool_format: str, tools: str) -> str:
    """The text describing ``tools`` (JSON text) in ``tool_format``; "" for an empty list.

    LLaMA-Factory 0.5's format gave "" for anything it could not read; the others refuse bad JSON.
    """
    if tool_format == "lf-0.5":
        try:
            parsed = json.loads(tools)
            return _lf05_tools(parsed) if len(parsed) else ""
        except Exception:
            return ""
    try:
        parsed = json.loads(tools)
    except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
        raise ChipspanError(f"tools column is not JSON ({str(exc)[:100]}): fix the dataset's tools text") from exc
    try:
        return _TOOLS[tool_format](parsed) if len(parsed) else ""
    except (KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ChipspanError(
            f"tools are not a list of function schemas with name and parameters ({exc!r}): fix the dataset"
        ) from exc


def lf05_call(content: str) -> tuple[str, str]:
    """LLaMA-Factory 0.5's reading of a function message: (name, arguments JSON); ("", "") if it is not one call."""
    try:
        function = json.loads(content)
        return function["name"], _dumps(function["arguments"])
    except Exception:
        return "", ""


def calls_text(tool_format: str, content: str) -> str:
    """The function-call text of ``content`` (JSON: one call or a list) in ``tool_format`` (not seed)."""
    try:
        parsed = json.loads(content)
        calls = [(c["name"], _dumps(c["arguments"])) for c in (parsed if isinstance(parsed, list) else [parsed])]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ChipspanError(
            f"function call {content[:60]!r} is not JSON with name and arguments: fix the dataset"
        ) from exc
    return _CALLS[tool_format](calls)


def extract_calls(tool_format: str, text: str) -> list[Call] | None:
    """The function calls a generated answer makes in ``tool_format``, ``[(name, arguments JSON)]``;
    None when the answer is text (no call, or one whose arguments are not a JSON object)."""
    try:
        calls = _EXTRACT[tool_format](text.strip())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if not calls or not all(isinstance(name, str) and name and isinstance(args, dict) for name, args in calls):
        return None
    return [(name, _dumps(args)) for name, args in calls]


_ACTION = re.compile(r"Action:\s*(.+?)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)
_TOOL_CALL = re.compile(r"<tool_call>\s*(.+?)\s*</tool_call>", re.DOTALL)


def _default_extract(text: str) -> list[tuple[str, object]]:
    return [(name.strip(), json.loads(args)) for name, args in _ACTION.findall(text)]


def _glm4_extract(text: str) -> list[tuple[str, object]]:
    name, args = text.split("\n", 1)
    return [(name.strip(), json.loads(args))]


def _llama3_extract(text: str) -> list[tuple[str, object]]:
    parsed = json.loads(text)
    return [(c["name"], c["parameters"]) for c in (parsed if isinstance(parsed, list) else [parsed])]


def _mistral_extract(text: str) -> list[tuple[str, object]]:
    parsed = json.loads(text.removeprefix("[TOOL_CALLS]").strip())
    return [(c["name"], c["arguments"]) for c in (parsed if isinstance(parsed, list) else [parsed])]


def _qwen_extract(text: str) -> list[tuple[str, object]]:
    found = [json.loads(call) for call in _TOOL_CALL.findall(text)]
    return [(c["name"], c["arguments"]) for c in found]


_EXTRACT: dict[str, Callable[[str], list[tuple[str, object]]]] = {
    "lf-0.5": _default_extract,  # LLaMA-Factory 0.5 wrote calls as "Action: ... Action Input: ..."
    "default": _default_extract,
    "llama3": _llama3_extract,
    "qwen": _qwen_extract,
    "mistral": _mistral_extract,
    "glm4": _glm4_extract,
}
