"""The part of Go's text/template that Ollama templates use, in Python, for the Modelfile tests.

Supported: text and `{{ }}` actions; `{{- ` and ` -}}` trim all white space (space, tab, CR, newline) on that side;
`{{/* comments */}}`; `if` / `else if` / `else` / `end`; `range PIPE`, `range $x := PIPE`, `range $i, $x := PIPE`
with `else`; `$x := PIPE` and `$x = PIPE` (a variable lives until the `end` of the block it is declared in; `=`
changes the nearest one, so a value set inside `range` is seen after it); fields `.A.B`, `.`, `$`, `$.A`, `$x.A`;
string ("..." with Go escapes, `raw`), number, true/false literals; calls `eq`, `ne`, `not`, `and`, `or` (Go
1.18+: they stop at the deciding argument and return it), `len`, and parentheses. Truth is Go's: false,
0, "", an empty list and nil are false. A map (the top-level values) gives nil for a missing key, as Ollama's
`missingkey=zero` does, printed `<no value>`; a message (a Go struct) has only its fields. Anything else raises.
"""

from __future__ import annotations

import re

SPACE = " \t\r\n"
TOKEN = re.compile(r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<open>\()|(?P<close>\))|(?P<number>-?\d+)'
                   r'|(?P<variable>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)|(?P<word>\w+))')
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


class Message:
    """A message as Ollama's template sees it (a Go struct: an unknown field is an error)."""

    FIELDS = ("Role", "Content", "Thinking", "Images", "ToolCalls", "ToolName", "ToolCallID")

    def __init__(self, role: str, content: str):
        self.values = {"Role": role, "Content": content, "Thinking": "", "Images": [], "ToolCalls": [],
                       "ToolName": "", "ToolCallID": ""}


def render(template: str, data: dict) -> str:
    nodes, rest = parse(lex(template), ())
    assert not rest, f"unexpected {{{{ {rest[0][1]} }}}}"
    out: list[str] = []
    run(nodes, data, [{"$": data}], out)
    return "".join(out)


def lex(template: str) -> list[tuple[str, str]]:
    """[('text', s) | ('action', s)] with the trim markers applied."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    while True:
        at = template.find("{{", pos)
        text = template[pos:] if at < 0 else template[pos:at]
        if trim_next:
            text = text.lstrip(SPACE)
        if at < 0:
            items.append(("text", text))
            return items
        end = template.find("}}", at)
        assert end >= 0, "unclosed action"
        inner = template[at + 2:end]
        if len(inner) >= 2 and inner[0] == "-" and inner[1] in SPACE:
            text, inner = text.rstrip(SPACE), inner[1:]
        trim_next = len(inner) >= 2 and inner[-1] == "-" and inner[-2] in SPACE
        if trim_next:
            inner = inner[:-1]
        items.append(("text", text))
        inner = inner.strip(SPACE)
        if not (inner.startswith("/*") and inner.endswith("*/")):
            items.append(("action", inner))
        pos = end + 2


def parse(items, stops):
    """(nodes, remaining items) up to an action whose first word is in `stops` (left first in remaining)."""
    nodes = []
    while items:
        kind, value = items[0]
        if kind == "text":
            nodes.append(("text", value))
            items = items[1:]
            continue
        word = value.split(" ", 1)[0]
        if word in stops:
            return nodes, items
        items = items[1:]
        if word in ("if", "range"):
            node, items = parse_block(word, value[len(word):].strip(), items)
            nodes.append(node)
        elif re.match(r"\$\w+\s*:?=", value):
            name, how, expr = re.match(r"(\$\w+)\s*(:?=)\s*(.*)", value, re.S).groups()
            nodes.append(("declare" if how == ":=" else "assign", name, tokens(expr)))
        else:
            nodes.append(("print", tokens(value)))
    assert not stops, f"missing {{{{ end }}}} (open: {stops})"
    return nodes, items


def parse_block(word: str, head: str, items):
    """An if (branches: [(condition, nodes)], else nodes) or a range (names, pipeline, nodes, else nodes)."""
    names: list[str] = []
    if word == "range":
        declared = re.match(r"(\$\w+)\s*(?:,\s*(\$\w+)\s*)?:=\s*(.*)", head, re.S)
        if declared:
            names = [n for n in declared.groups()[:2] if n]
            head = declared.group(3)
    branches, otherwise = [(tokens(head), None)], []
    while True:
        body, items = parse(items, ("else", "end"))
        branches[-1] = (branches[-1][0], body)
        action = items[0][1]
        items = items[1:]
        if action == "end":
            break
        if action.startswith("else if ") and word == "if":
            branches.append((tokens(action[len("else if "):]), None))
            continue
        assert action == "else", f"unsupported {{{{ {action} }}}}"
        otherwise, items = parse(items, ("end",))
        items = items[1:]
        break
    if word == "if":
        return ("if", branches, otherwise), items
    return ("range", names, branches[0][0], branches[0][1], otherwise), items


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) for each token: a kind is a group name of TOKEN."""
    out, pos = [], 0
    while expr[pos:].strip(SPACE):
        m = TOKEN.match(expr, pos)
        assert m, f"cannot read {expr[pos:]!r}"
        out.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return out


def run(nodes, dot, scopes: list[dict], out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            out.append(show(evaluate(node[1], dot, scopes)))
        elif kind == "declare":
            scopes[-1][node[1]] = evaluate(node[2], dot, scopes)
        elif kind == "assign":
            scope = next((s for s in reversed(scopes) if node[1] in s), None)
            assert scope is not None, f"undefined variable {node[1]}"
            scope[node[1]] = evaluate(node[2], dot, scopes)
        elif kind == "if":
            for condition, body in node[1]:
                if truth(evaluate(condition, dot, scopes)):
                    run(body, dot, [*scopes, {}], out)
                    break
            else:
                run(node[2], dot, [*scopes, {}], out)
        else:
            _, names, pipeline, body, otherwise = node
            items = evaluate(pipeline, dot, scopes)
            assert items is None or isinstance(items, list), "range over a list only"
            for i, item in enumerate(items or []):
                own = dict(zip(names, [item] if len(names) == 1 else [i, item], strict=False))
                run(body, item, [*scopes, own], out)
            if not items:
                run(otherwise, dot, [*scopes, {}], out)


def evaluate(toks, dot, scopes):
    """A command: a function and its arguments, or one operand."""
    assert toks, "empty command"
    kind, value = toks[0]
    if kind == "word" and value in FUNCTIONS:
        args = arguments(toks[1:])
        return FUNCTIONS[value](lambda a: operand(a, dot, scopes), args)
    args = arguments(toks)
    assert len(args) == 1, f"{value} is not a function"
    return operand(args[0], dot, scopes)


def arguments(toks):
    """Split into operands, a parenthesized command being one."""
    args, i = [], 0
    while i < len(toks):
        if toks[i][0] == "open":
            depth, j = 1, i + 1
            while depth:
                depth += {"open": 1, "close": -1}.get(toks[j][0], 0)
                j += 1
            args.append(("command", toks[i + 1:j - 1]))
            i = j
        else:
            args.append(toks[i])
            i += 1
    return args


def operand(arg, dot, scopes):
    kind, value = arg
    if kind == "command":
        return evaluate(value, dot, scopes)
    if kind == "string":
        return re.sub(r"\\(.)", lambda m: ESCAPES[m.group(1)], value[1:-1])
    if kind == "raw":
        return value[1:-1]
    if kind == "number":
        return int(value)
    if kind == "word":
        assert value in ("true", "false"), f"unknown word {value}"
        return value == "true"
    if kind == "variable":
        name, *path = value.split(".")
        scope = next((s for s in reversed(scopes) if name in s), None)
        assert scope is not None, f"undefined variable {name}"
        return fields(scope[name], path)
    return fields(dot, value.split(".")[1:] if value != "." else [])


def fields(value, path):
    for name in path:
        if isinstance(value, dict):
            value = value.get(name)
        elif isinstance(value, Message):
            assert name in Message.FIELDS, f"can't evaluate field {name} in type Message"
            value = value.values[name]
        else:
            raise AssertionError(f"can't evaluate field {name} of {value!r}")
    return value


def truth(value) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, str, list, dict)):
        return bool(value)
    return True


def show(value) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    assert isinstance(value, (str, int)), f"printing {value!r} is not supported"
    return str(value)


def _and(get, args):
    value = None
    for a in args:
        value = get(a)
        if not truth(value):
            return value
    return value


def _or(get, args):
    value = None
    for a in args:
        value = get(a)
        if truth(value):
            return value
    return value


FUNCTIONS = {
    "eq": lambda get, args: any(get(args[0]) == get(a) for a in args[1:]),
    "ne": lambda get, args: get(args[0]) != get(args[1]),
    "not": lambda get, args: not truth(get(args[0])),
    "and": _and,
    "or": _or,
    "len": lambda get, args: len(get(args[0])),
}
