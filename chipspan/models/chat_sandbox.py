"""Chat templates run bounded: a template from a model folder is untrusted code.

Jinja's sandbox stops unsafe attribute access; this environment also bounds the work of each render:

- reading: ``{% include %}``, ``{% import %}`` and ``{% extends %}`` are refused (a template reads no file),
  and a template's source is at most ``MAX_SOURCE_CHARS`` characters;
- size: the output is at most ``MAX_OUTPUT_CHARS`` characters, and so is every value the template makes.
  Operations that could make a larger value in one step (repetition, powers, padding, ``replace``,
  ``join``, format widths, ``tojson`` indents) are checked before they run; everything a template calls
  is checked after; all text it produces (macros and ``{% set %}`` blocks included) is counted against
  ``MAX_PRODUCED_CHARS``;
- work: at most ``MAX_STEPS`` steps (loop iterations, calls, filters, output pieces) and ``MAX_SECONDS``
  seconds, calls nested at most ``MAX_DEPTH`` deep (recursive macros and loops), ranges of at most
  ``MAX_RANGE`` numbers, integers of at most ``MAX_INT_BITS`` bits.

A template that passes a limit raises ``TemplateRefused`` with a message naming the limit. The limits are
far above what real chat templates do (a few kB of code; output the size of the conversation).
"""

from __future__ import annotations

import contextvars
import functools
import re
import string
import time
import types
from collections.abc import ItemsView, Iterable, Iterator, KeysView, ValuesView
from dataclasses import dataclass

import jinja2
import jinja2.nodes as nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

MAX_SOURCE_CHARS = 1_000_000
MAX_OUTPUT_CHARS = 8_000_000
MAX_PRODUCED_CHARS = 4 * MAX_OUTPUT_CHARS
MAX_ITEMS = 1_000_000  # elements of one list, tuple or dict
MAX_STEPS = 1_000_000
MAX_SECONDS = 5.0
MAX_DEPTH = 64
MAX_RANGE = 100_000
MAX_INT_BITS = 10_000
_FILE_TAGS = {
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from ... import",
    nodes.Extends: "extends",
}


class TemplateRefused(Exception):
    """A template that reads files or passes a limit; the message says which, in a few words."""


# ---- the budget of one render --------------------------------------------------------------------


@dataclass
class _Budget:
    """Work done so far in one render: steps, characters produced, call depth; and when time is up."""

    deadline: float
    steps: int = 0
    produced: int = 0
    depth: int = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateRefused(f"it ran past {MAX_STEPS:,} steps (loop iterations, calls, output pieces)")
        if not self.steps % 64 and time.monotonic() > self.deadline:
            raise TemplateRefused(f"it ran past {MAX_SECONDS:g} seconds")

    def produce(self, chars: int) -> None:
        self.produced += chars
        if self.produced > MAX_PRODUCED_CHARS:
            raise TemplateRefused(f"it produced more than {MAX_PRODUCED_CHARS:,} characters of text")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _step() -> None:
    """Count one step of the current render (none is current while a template compiles)."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()


def render(template: jinja2.Template, variables: dict) -> str:
    """The template's text for ``variables``, streamed and bounded; ``TemplateRefused`` past a limit."""
    token = _BUDGET.set(_Budget(deadline=time.monotonic() + MAX_SECONDS))
    try:
        pieces, total = [], 0
        for piece in template.generate(**variables):
            total += len(piece)
            if total > MAX_OUTPUT_CHARS:
                raise TemplateRefused(f"its output passed {MAX_OUTPUT_CHARS:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        _BUDGET.reset(token)


# ---- sizes ---------------------------------------------------------------------------------------


def _size(value: object, indent: int = 0, depth: int = 0, cap: int = MAX_OUTPUT_CHARS) -> int:
    """About how many characters ``str(value)`` (or JSON with ``indent``) has, without making that text;
    counting stops past ``cap`` (so a structure that shares one value many times costs little to size)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return 24
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")
    if isinstance(value, dict):
        value = value.items()
    elif not isinstance(value, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
        return 64  # other objects (undefined, macros, loop state, iterators) print a short repr
    _check_items(len(value))
    pad = indent * (depth + 1) + 1 if indent else 0
    total = 2
    for item in value:
        total += _size(item, indent, depth + 1, cap - total) + 2 + pad
        if total > cap:
            break
    return total


def _check_chars(chars: int) -> None:
    if chars > MAX_OUTPUT_CHARS:
        raise TemplateRefused(f"it made a value of more than {MAX_OUTPUT_CHARS:,} characters")


def _check_items(items: int) -> None:
    if items > MAX_ITEMS:
        raise TemplateRefused(f"it made a collection of more than {MAX_ITEMS:,} items")


def _checked(value):
    """``value``, after checking its size."""
    _check_chars(_size(value))
    return value


def _text(value: object) -> str:
    """``str(value)``, its size checked before the text is made."""
    if isinstance(value, str):
        return value
    _check_chars(_size(value))
    return _checked(str(value))


def _bounded_items(values: Iterator) -> list:
    """The items of an iterator (such as ``map``'s), stopped as soon as they grow past the size limits."""
    items, chars = [], 0
    for item in values:
        _step()
        items.append(item)
        chars += _size(item) + 2
        _check_items(len(items))
        _check_chars(chars)
    return items


def _materialized(value):
    """An iterator as a bounded list (a filter or method would make one, unbounded); other values as they are."""
    return _bounded_items(value) if isinstance(value, Iterator) else value


def _number(value: object) -> int:
    """An integer argument that sets a size (a width, a count); anything else counts as 0."""
    return value if isinstance(value, int) else 0


# ---- checks before an operation that can make a large value in one step ---------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _widths(spec: str) -> int:
    """The sum of the numbers in a format spec (widths and precisions pad the text to that size)."""
    return sum(int(d) if len(d) < 10 else MAX_OUTPUT_CHARS + 1 for d in re.findall(r"\d+", spec))


def _largest(values) -> int:
    return max((_size(v) for v in values), default=0)


def _check_percent(fmt: object, values: object) -> None:
    """``fmt % values``: the format's text, each spec's width, and an argument per spec."""
    if not isinstance(fmt, str):
        return
    specs = [m.group(0) for m in _PERCENT_SPEC.finditer(fmt)]
    if any("*" in spec for spec in specs):
        raise TemplateRefused("it uses a '*' width in a % format")
    arguments = values.values() if isinstance(values, dict) else values if isinstance(values, tuple) else [values]
    _check_chars(len(fmt) + sum(_widths(s) for s in specs) + len(specs) * _largest(arguments))


def _check_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """``fmt.format(*args, **kwargs)``: the format's text, each field's width, and an argument per field."""
    fields = [(name, spec) for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None]
    if any(spec and "{" in spec for _, spec in fields):
        raise TemplateRefused("it uses a nested {} width in a format string")
    largest = _largest([*args, *kwargs.values()])
    _check_chars(len(fmt) + sum(_widths(spec or "") for _, spec in fields) + len(fields) * largest)


_SEQUENCES = (str, bytes, list, tuple)


def _check_binop(operator: str, left: object, right: object) -> None:
    if operator == "+":
        if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            _check_chars(_size(left) + _size(right))
    elif operator == "*":
        if isinstance(right, _SEQUENCES) and isinstance(left, int):
            left, right = right, left
        if isinstance(left, _SEQUENCES) and isinstance(right, int):
            _check_chars(_size(left) * right)
            _check_items(len(left) * right if isinstance(left, (list, tuple)) else 0)
        elif isinstance(left, int) and isinstance(right, int):
            _check_bits(left.bit_length() + right.bit_length())
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            _check_bits(right * left.bit_length())
    elif operator == "%":
        _check_percent(left, right)


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateRefused(f"it made an integer of more than {MAX_INT_BITS:,} bits")


def _like(text: str | bytes, piece: str) -> str | bytes:
    return piece.encode() if isinstance(text, bytes) else piece


def _padded(text, width=0, *_):
    _check_chars(max(len(text), _number(width)))


def _tabs_expanded(text, tabsize=8):
    _check_chars(len(text) + text.count(_like(text, "\t")) * max(_number(tabsize), 0))


def _replaced(text, old, new, count=-1):
    if not isinstance(old, (str, bytes)) or not isinstance(new, (str, bytes)):
        return
    found = len(text) + 1 if not old else text.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    _check_chars(len(text) + found * (len(new) - len(old)))


def _joined(separator, items=(), *_):
    items = list(items) if isinstance(items, Iterable) and not isinstance(items, Iterator) else []  # see call
    _check_items(len(items))
    _check_chars(sum(_size(i) for i in items) + len(items) * _size(separator))


def _translated(text, table=None):
    values = table.values() if isinstance(table, dict) else ()
    _check_chars(len(text) * max([1, *(_size(v) for v in values)]))


def _bytes_made(number, length=1, *_, **__):
    _check_chars(_number(length))


# Methods of str/bytes (and int) that can make a value much larger than their arguments.
_METHOD_CHECKS = {
    "center": _padded,
    "ljust": _padded,
    "rjust": _padded,
    "zfill": _padded,
    "expandtabs": _tabs_expanded,
    "replace": _replaced,
    "join": _joined,
    "translate": _translated,
    "to_bytes": _bytes_made,
}


def _method_check(function: object):
    """The check for a builtin str/bytes/int method that can amplify, or None."""
    owner = getattr(function, "__self__", None)
    if isinstance(function, types.BuiltinMethodType) and isinstance(owner, (str, bytes, int)):
        return _METHOD_CHECKS.get(function.__name__)
    return None


def _indented(text, width=4, *_, **__):
    indent = len(width) if isinstance(width, str) else _number(width)
    _check_chars(indent)
    _check_chars(_size(text) + (_text(text).count("\n") + 1) * indent)


def _wrapped(text, width=79, break_long_words=True, wrapstring=None, *_):
    lines = _size(text) // max(_number(width), 1) + _text(text).count("\n") + 1
    _check_chars(_size(text) + lines * _size(wrapstring or "\n"))


def _summed(values, attribute=None, start=0):
    if not isinstance(start, (int, float)):
        raise TemplateRefused("it sums values that are not numbers")


def _jsoned(value, ensure_ascii=False, indent=None, separators=None, *_, **__):
    spaces = len(indent) if isinstance(indent, str) else _number(indent)
    _check_chars(spaces)
    between = sum(len(s) for s in separators if isinstance(s, str)) if isinstance(separators, (list, tuple)) else 2
    _check_chars(_size(value, indent=spaces) * max(between // 2, 1))  # _size counts 2 characters between items


def _count_limit(values, count=1, *_):
    _check_items(_number(count))


# Filters that can make a value much larger than their arguments (others are checked after they run).
_FILTER_CHECKS = {
    "center": lambda value, width=80: _padded(_text(value), width),
    "indent": _indented,
    "wordwrap": _wrapped,
    "format": lambda value, *a, **k: _check_percent(value, a or k),
    "replace": lambda value, old, new, count=None: _replaced(_text(value), old, new, -1 if count is None else count),
    "join": lambda value, d="", attribute=None: _joined(d, value),
    "sum": _summed,
    "batch": _count_limit,
    "slice": _count_limit,
    "tojson": _jsoned,
    "string": lambda value: _check_chars(_size(value)),
    "pprint": lambda value: _check_chars(_size(value, indent=1)),
    "list": lambda value: _check_items(len(value) if isinstance(value, (str, bytes)) else 0),
}


def _bounded_filter(name: str, function):
    """``function`` (a filter) counted as a step, its iterator arguments bounded, and its result checked."""
    check = _FILTER_CHECKS.get(name)
    passes = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0  # context/environment first

    @functools.wraps(function)
    def bounded(*args, **kwargs):
        _step()
        args = tuple(_materialized(a) for a in args)
        if check is not None:
            check(*args[passes:], **kwargs)
        return _checked(function(*args, **kwargs))

    return bounded


# ---- the environment ------------------------------------------------------------------------------


# Filters the rewritten template calls; their names hold a space, so no template can name them. They
# take the context so that Jinja never runs them while compiling (it folds other filters of constants).
_ITER, _PIECE, _CONCAT = "chipspan iter", "chipspan piece", "chipspan concat"


def _bounded(name: str, node: nodes.Expr, *args: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, name, list(args), [], None, None, lineno=node.lineno)


class _Bound(NodeTransformer):
    """Rewrites a parsed template so that loops, output pieces and ``~`` go through the bounded filters."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = _bounded(_ITER, node.iter)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [
            _bounded(_PIECE, nodes.Const(n.data, lineno=n.lineno) if isinstance(n, nodes.TemplateData) else n)
            for n in node.nodes
        ]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        node = self.generic_visit(node)
        return _bounded(_CONCAT, *node.nodes)


def _bounded_iter(values) -> Iterator:
    for value in values:
        _step()
        yield value


@jinja2.pass_context
def _piece(context, value) -> str:
    """An output piece as text, counted as produced."""
    text = _text(value)
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
        budget.produce(len(text))
    return text


@jinja2.pass_context
def _concat(context, *values) -> str:
    texts = [_text(v) for v in values]
    _check_chars(sum(map(len, texts)))
    return "".join(texts)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the limits of this module (see the module notes)."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, filters: dict | None = None, **options):
        """``filters`` are added to Jinja's (and bounded like them); ``options`` as for Jinja's environment."""
        super().__init__(**options)
        self.filters.update(filters or {})
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters.update(
            {
                _ITER: jinja2.pass_context(lambda context, values: _bounded_iter(values)),
                _PIECE: _piece,
                _CONCAT: _concat,
            }
        )
        self.globals.pop("lipsum", None)  # generates any amount of text; no chat template uses it
        self.globals["range"] = _bounded_range

    def compile_template(self, source: str) -> jinja2.Template:
        """The bounded template of ``source``; ``TemplateRefused`` for one that reads files or is too long,
        ``TemplateSyntaxError`` for one that does not parse."""
        if len(source) > MAX_SOURCE_CHARS:
            raise TemplateRefused(f"it is longer than {MAX_SOURCE_CHARS:,} characters")
        tree = self.parse(source)
        for kind, tag in _FILE_TAGS.items():
            found = next(tree.find_all(kind), None)
            if found is not None:
                raise TemplateRefused(
                    f"it uses {{% {tag} %}} on line {found.lineno}, and a chat template may not read other files"
                )
        return self.from_string(_Bound().visit(tree))

    # Jinja's sandbox hooks.

    def call_binop(self, context, operator, left, right):
        _step()
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        _step()
        budget = _BUDGET.get()
        if budget is not None:
            budget.depth += 1
        try:
            if budget is not None and budget.depth > MAX_DEPTH:
                raise TemplateRefused(f"its calls nest deeper than {MAX_DEPTH} (recursion)")
            args = tuple(_materialized(a) for a in args)
            if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
                args = (_bounded_iter(args[0]), *args[1:])
            check = _method_check(__obj)
            if check is not None:
                check(__obj.__self__, *args, **{k: v for k, v in kwargs.items() if not k.startswith("_")})
            return _checked(super().call(__context, __obj, *args, **kwargs))
        finally:
            if budget is not None:
                budget.depth -= 1

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        @functools.wraps(wrapped)
        def bounded(*args, **kwargs):
            if value.__name__ == "format_map":
                _check_format(fmt, (), args[0] if args and isinstance(args[0], dict) else {})
            else:
                _check_format(fmt, args, kwargs)
            return wrapped(*args, **kwargs)

        return bounded


def _bounded_range(*args) -> range:
    try:
        numbers = range(*args)
        too_many = len(numbers) > MAX_RANGE
    except OverflowError:
        too_many = True
    if too_many:
        raise TemplateRefused(f"it asks for a range of more than {MAX_RANGE:,} numbers")
    return numbers
