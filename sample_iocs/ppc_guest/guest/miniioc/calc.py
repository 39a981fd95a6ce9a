"""The calc record's expression language (a practical subset of EPICS's CALC).

Supported, case-insensitively:

- numbers (``3``, ``.5``, ``1e-3``, ``0x1F``), ``INF``, ``NAN``, ``PI``, ``D2R``,
  ``R2D``, ``RNDM``; variables ``A`` .. ``L`` and ``VAL`` (the record's current value)
- ``+ - * / %``, ``^`` and ``**`` (power), unary ``-``
- comparisons ``< <= > >= = == != #``; logic ``&& || !``;
  bitwise ``& | XOR AND OR ~ NOT << >>``
- ``c ? a : b``, and ``c ? a`` which keeps ``VAL`` when ``c`` is false
- functions ``ABS SQR SQRT EXP LN LOG LOGE LOG2 SIN COS TAN ASIN ACOS ATAN
  SINH COSH TANH CEIL FLOOR NINT ISINF ISNAN FINITE MIN MAX ATAN2 FMOD``

``SQR`` is the square root, as in EPICS. ``ATAN2(a, b)`` is ``atan2(b, a)``:
EPICS takes the arguments in the order opposite to C. Assignments (``:=``) and
``;``-separated statements are not supported. Division by zero gives
``inf``/``nan`` as in C rather than raising.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Callable

Env = Mapping[str, float]
Node = Callable[[Env], float]

VARIABLES = tuple("ABCDEFGHIJKL")


class CalcError(ValueError):
    """An expression that cannot be parsed."""


def compile_calc(expression: str) -> Node:
    """Parse ``expression`` once; the result evaluates it for a mapping of A..L, VAL."""
    parser = _Parser(_tokenize(expression), expression)
    node = parser.expression(0)
    if not parser.at_end():
        raise CalcError(f"unexpected {parser.peek()!r} in {expression!r}")
    return node


def evaluate(expression: str, env: Env | None = None) -> float:
    """Parse and evaluate in one go (for tests and the shell)."""
    return compile_calc(expression)(env or {})


def used_variables(expression: str) -> list[str]:
    """The A..L variables an expression reads, in order of first use."""
    seen: list[str] = []
    for kind, text in _tokenize(expression):
        if kind == "name" and text in VARIABLES and text not in seen:
            seen.append(text)
    return seen


# -- tokens -----------------------------------------------------------------

_OPERATORS = sorted(
    [
        "**",
        ">>>",
        ">>",
        "<<",
        "<=",
        ">=",
        "==",
        "!=",
        "&&",
        "||",
        ":=",
        "+",
        "-",
        "*",
        "/",
        "%",
        "^",
        "<",
        ">",
        "=",
        "#",
        "!",
        "~",
        "&",
        "|",
        "?",
        ":",
        "(",
        ")",
        ",",
        ";",
    ],
    key=len,
    reverse=True,
)
_WORD_OPERATORS = {"AND": "&", "OR": "|", "XOR": "XOR", "NOT": "~"}


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
            continue
        if char.isdigit() or (char == "." and i + 1 < len(text) and text[i + 1].isdigit()):
            end = _number_end(text, i)
            tokens.append(("number", text[i:end]))
            i = end
            continue
        if char.isalpha() or char == "_":
            end = i
            while end < len(text) and (text[end].isalnum() or text[end] == "_"):
                end += 1
            word = text[i:end].upper()
            if word in _WORD_OPERATORS:
                tokens.append(("op", _WORD_OPERATORS[word]))
            else:
                tokens.append(("name", word))
            i = end
            continue
        for op in _OPERATORS:
            if text.startswith(op, i):
                tokens.append(("op", op))
                i += len(op)
                break
        else:
            raise CalcError(f"unexpected character {char!r} in {text!r}")
    return tokens


def _number_end(text: str, i: int) -> int:
    if text.startswith(("0x", "0X"), i):
        end = i + 2
        while end < len(text) and text[end] in "0123456789abcdefABCDEF":
            end += 1
        return end
    end = i
    while end < len(text) and (text[end].isdigit() or text[end] == "."):
        end += 1
    if end < len(text) and text[end] in "eE":
        exp = end + 1
        if exp < len(text) and text[exp] in "+-":
            exp += 1
        if exp < len(text) and text[exp].isdigit():
            end = exp
            while end < len(text) and text[end].isdigit():
                end += 1
    return end


# -- semantics ----------------------------------------------------------------


def _div(a: float, b: float) -> float:
    try:
        return a / b
    except ZeroDivisionError:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _mod(a: float, b: float) -> float:
    try:
        return math.fmod(a, b)
    except (ZeroDivisionError, ValueError):
        return math.nan


def _pow(a: float, b: float) -> float:
    try:
        result = a**b
    except ZeroDivisionError:
        return math.inf
    except OverflowError:
        return math.inf
    if isinstance(result, complex):
        return math.nan
    return float(result)


def _as_int(value: float) -> int:
    if math.isnan(value) or math.isinf(value):
        return 0
    return int(value)


def _nint(value: float) -> float:
    # Half away from zero, like C's lround (Python's round() rounds half to even).
    return float(math.floor(value + 0.5) if value >= 0 else math.ceil(value - 0.5))


def _safe(fn: Callable[..., float]) -> Callable[..., float]:
    def wrapped(*args: float) -> float:
        try:
            return float(fn(*args))
        except (ValueError, OverflowError):
            return math.nan

    return wrapped


def _log(fn: Callable[[float], float]) -> Callable[[float], float]:
    def wrapped(x: float) -> float:
        if x == 0:
            return -math.inf
        if x < 0 or math.isnan(x):
            return math.nan
        return fn(x)

    return wrapped


_BINARY: dict[str, tuple[int, bool, Callable[[float, float], float]]] = {
    # operator: (binding power, right-associative, function)
    "||": (10, False, lambda a, b: float(bool(a) or bool(b))),
    "&&": (20, False, lambda a, b: float(bool(a) and bool(b))),
    "|": (30, False, lambda a, b: float(_as_int(a) | _as_int(b))),
    "XOR": (35, False, lambda a, b: float(_as_int(a) ^ _as_int(b))),
    "&": (40, False, lambda a, b: float(_as_int(a) & _as_int(b))),
    "=": (50, False, lambda a, b: float(a == b)),
    "==": (50, False, lambda a, b: float(a == b)),
    "!=": (50, False, lambda a, b: float(a != b)),
    "#": (50, False, lambda a, b: float(a != b)),
    "<": (60, False, lambda a, b: float(a < b)),
    "<=": (60, False, lambda a, b: float(a <= b)),
    ">": (60, False, lambda a, b: float(a > b)),
    ">=": (60, False, lambda a, b: float(a >= b)),
    "<<": (70, False, lambda a, b: float(_as_int(a) << (_as_int(b) & 31))),
    ">>": (70, False, lambda a, b: float(_as_int(a) >> (_as_int(b) & 31))),
    ">>>": (70, False, lambda a, b: float((_as_int(a) & 0xFFFFFFFF) >> (_as_int(b) & 31))),
    "+": (80, False, lambda a, b: a + b),
    "-": (80, False, lambda a, b: a - b),
    "*": (90, False, lambda a, b: a * b),
    "/": (90, False, _div),
    "%": (90, False, _mod),
    "^": (110, True, _pow),
    "**": (110, True, _pow),
}
_TERNARY_POWER = 5
_UNARY_POWER = 100

_FUNCTIONS: dict[str, tuple[int, Callable[..., float]]] = {
    # name: (number of arguments, -1 for one or more, function)
    "ABS": (1, abs),
    "SQR": (1, _safe(math.sqrt)),
    "SQRT": (1, _safe(math.sqrt)),
    "EXP": (1, _safe(math.exp)),
    "LN": (1, _log(math.log)),
    "LOGE": (1, _log(math.log)),
    "LOG": (1, _log(math.log10)),
    "LOG2": (1, _log(math.log2)),
    "SIN": (1, _safe(math.sin)),
    "COS": (1, _safe(math.cos)),
    "TAN": (1, _safe(math.tan)),
    "ASIN": (1, _safe(math.asin)),
    "ACOS": (1, _safe(math.acos)),
    "ATAN": (1, _safe(math.atan)),
    "SINH": (1, _safe(math.sinh)),
    "COSH": (1, _safe(math.cosh)),
    "TANH": (1, _safe(math.tanh)),
    "CEIL": (1, _safe(math.ceil)),
    "FLOOR": (1, _safe(math.floor)),
    "NINT": (1, _safe(_nint)),
    "ISINF": (1, lambda x: float(math.isinf(x))),
    "ISNAN": (-1, lambda *xs: float(any(math.isnan(x) for x in xs))),
    "FINITE": (-1, lambda *xs: float(all(math.isfinite(x) for x in xs))),
    "MIN": (-1, lambda *xs: min(xs)),
    "MAX": (-1, lambda *xs: max(xs)),
    "ATAN2": (2, _safe(lambda a, b: math.atan2(b, a))),
    "FMOD": (2, _mod),
}

_CONSTANTS: dict[str, float] = {
    "PI": math.pi,
    "D2R": math.pi / 180.0,
    "R2D": 180.0 / math.pi,
    "INF": math.inf,
    "NAN": math.nan,
}


class _Parser:
    """Pratt parser producing closures, so evaluation needs no further parsing."""

    def __init__(self, tokens: list[tuple[str, str]], source: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.source = source

    def at_end(self) -> bool:
        return self.pos >= len(self.tokens)

    def peek(self) -> str:
        return self.tokens[self.pos][1] if not self.at_end() else ""

    def take(self) -> tuple[str, str]:
        if self.at_end():
            raise CalcError(f"unexpected end of expression {self.source!r}")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def expect(self, op: str) -> None:
        kind, text = self.take()
        if kind != "op" or text != op:
            raise CalcError(f"expected {op!r}, found {text!r} in {self.source!r}")

    def expression(self, min_power: int) -> Node:
        left = self.prefix()
        while not self.at_end():
            kind, op = self.tokens[self.pos]
            if kind != "op":
                raise CalcError(f"unexpected {op!r} in {self.source!r}")
            if op == "?":
                if _TERNARY_POWER < min_power:
                    break
                self.pos += 1
                left = self.conditional(left)
                continue
            if op in (":=", ";"):
                raise CalcError(f"assignments and ';' are not supported: {self.source!r}")
            if op not in _BINARY:
                break
            power, right_assoc, fn = _BINARY[op]
            if power < min_power:
                break
            self.pos += 1
            right = self.expression(power if right_assoc else power + 1)
            left = _binary(fn, left, right)
        return left

    def conditional(self, condition: Node) -> Node:
        when_true = self.expression(_TERNARY_POWER)
        if self.peek() == ":":
            self.pos += 1
            when_false = self.expression(_TERNARY_POWER)
        else:
            # "c ? a" leaves the value unchanged when c is false.
            def when_false(env: Env) -> float:
                return float(env.get("VAL", 0.0))

        def node(env: Env) -> float:
            return when_true(env) if condition(env) else when_false(env)

        return node

    def prefix(self) -> Node:
        kind, text = self.take()
        if kind == "number":
            value = float(int(text, 16)) if text.lower().startswith("0x") else float(text)
            return lambda env: value
        if kind == "name":
            return self.name(text)
        if text == "(":
            inner = self.expression(0)
            self.expect(")")
            return inner
        if text in ("-", "+", "!", "~"):
            operand = self.expression(_UNARY_POWER)
            if text == "-":
                return lambda env: -operand(env)
            if text == "+":
                return operand
            if text == "!":
                return lambda env: float(not operand(env))
            return lambda env: float(~_as_int(operand(env)))
        raise CalcError(f"unexpected {text!r} in {self.source!r}")

    def name(self, word: str) -> Node:
        if word in VARIABLES or word == "VAL":
            return lambda env: float(env.get(word, 0.0))
        if word in _CONSTANTS:
            value = _CONSTANTS[word]
            return lambda env: value
        if word == "RNDM":
            return lambda env: random.random()
        if word in _FUNCTIONS:
            arity, fn = _FUNCTIONS[word]
            args = self.arguments(word)
            if arity >= 0 and len(args) != arity:
                raise CalcError(f"{word} takes {arity} argument(s) in {self.source!r}")
            if not args:
                raise CalcError(f"{word} needs arguments in {self.source!r}")
            return lambda env: float(fn(*(arg(env) for arg in args)))
        raise CalcError(f"unknown name {word!r} in {self.source!r}")

    def arguments(self, word: str) -> list[Node]:
        if self.peek() != "(":
            raise CalcError(f"{word} needs '(' in {self.source!r}")
        self.pos += 1
        args = [self.expression(0)]
        while self.peek() == ",":
            self.pos += 1
            args.append(self.expression(0))
        self.expect(")")
        return args


def _binary(fn: Callable[[float, float], float], left: Node, right: Node) -> Node:
    return lambda env: fn(left(env), right(env))
