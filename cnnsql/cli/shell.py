"""`cnnsql shell`: an interactive EvaDB SQL shell with `pg` and the CNN functions registered.

EvaDB's own shell is a client talking to `evadb_server` over TCP without authentication, so
any local user could send it statements (CREATE FUNCTION runs arbitrary Python). This shell
runs the same EvaDB statements in-process instead: same syntax, same prompt, no open port.
"""
from __future__ import annotations

import sys

import pandas as pd

from cnnsql.placements import evadb_session
from cnnsql.core.errors import CnnsqlError

PROMPT, CONTINUE = "evadb=# ", "evadb-# "
BANNER = ("EvaDB shell (cnnsql). Data source: pg (cifar_train, cifar_test, ...). Functions: TorchCNN, "
          "TensorflowCNN, VeloxCNN, OnnxruntimeCNN.\nEnd statements with ';'. Example: SELECT id, TorchCNN(img) FROM pg.cifar_test "
          "WHERE id < 5;\nType EXIT; or Ctrl-D to leave.")


def show(df: pd.DataFrame) -> str:
    if "probs" in df.columns:
        df = df.assign(probs=[None if p is None else "[" + " ".join(f"{v:.3f}" for v in p) + "]" for p in df.probs])
    if "img" in df.columns:
        df = df.assign(img=[s[:16] + "..." if isinstance(s, str) and len(s) > 16 else s for s in df.img])
    table = df.to_string(index=False, max_rows=50, max_colwidth=80)
    return f"{table}\n({len(df)} row{'s' if len(df) != 1 else ''})"


def statements(lines):
    """Split input lines into ';'-terminated statements (comments dropped)."""
    buf = []
    for line in lines:
        line = line.split("--", 1)[0] if line.lstrip().startswith("--") else line
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";"):
            buf = []
            if text.rstrip(";").strip():
                yield text
    rest = "\n".join(buf).strip()
    if rest:
        yield rest


def execute(cursor, statement: str) -> bool:
    """Run one statement and print its result; False when the user asked to leave."""
    if statement.rstrip(";").strip().upper() in ("EXIT", "QUIT"):
        return False
    try:
        print(show(evadb_session.run(cursor, statement)), flush=True)
    except CnnsqlError as exc:
        print(f"ERROR: {exc}", flush=True)
    return True


def _interactive_lines():
    try:
        import readline  # noqa: F401  (history and line editing)
    except ImportError:
        pass
    prompt = PROMPT
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return
        yield line
        prompt = PROMPT if line.rstrip().endswith(";") or not line.strip() and prompt == PROMPT else CONTINUE


def run_shell(commands: list[str] | None = None) -> None:
    cursor = evadb_session.connect()
    if commands:
        for statement in statements(commands):
            if not execute(cursor, statement):
                break
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(BANNER, flush=True)
    for statement in statements(_interactive_lines() if interactive else sys.stdin.read().splitlines()):
        if not execute(cursor, statement):
            break
