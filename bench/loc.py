"""Code lines of the given folders after `ruff format` (default settings), without blank lines, comments and docstrings.

    .venv/bin/python bench/loc.py alignpipe tasks flows cli          # bench/PROTOCOL.md, issue 25's row
"""

import ast
import io
import shutil
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def count(src: str) -> int:
    """Lines that hold a code token and are not part of a docstring."""
    tree = ast.parse(src)
    doc = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                doc.update(range(first.lineno, first.end_lineno + 1))
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - doc)

def main(dirs: list[str]) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        for d in dirs:
            shutil.copytree(ROOT / d, Path(tmp) / d, ignore=shutil.ignore_patterns("__pycache__"))
        # --isolated: ruff's defaults (line length 88), whatever a pyproject says
        subprocess.run([sys.executable, "-m", "ruff", "format", "-q", "--isolated", tmp], check=True)
        return {d: sum(count(p.read_text()) for p in (Path(tmp) / d).rglob("*.py")) for d in dirs}


if __name__ == "__main__":
    lines = main(sys.argv[1:])
    print(" ".join(f"{d}={n}" for d, n in lines.items()), f"total={sum(lines.values())}")
