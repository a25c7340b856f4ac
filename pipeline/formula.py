"""The integer formula that composes a multi-head target (``mask*6 + gender*3 + age``)."""

from __future__ import annotations

import ast

_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Name, ast.Load,
                  ast.Constant, ast.FloorDiv, ast.Mod)


def check_formula(formula: str) -> set[str]:
    """Parse an integer formula such as ``mask*6 + gender*3 + age``; return its names."""
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as error:
        raise ValueError(f"cannot parse formula {formula!r}: {error.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ValueError(f"formula {formula!r} may use only names, integers, + - * // %")
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def eval_formula(formula: str, values: dict[str, int]) -> int:
    """Evaluate a checked formula on integer head values."""
    check_formula(formula)
    return int(eval(compile(formula, "<compose>", "eval"), {"__builtins__": {}}, dict(values)))
