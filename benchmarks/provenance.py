"""Where a benchmark's code came from, for its results: `git_output(args, root)`.

Contract: the output of `git -C root ARGS` (its final newline dropped), or "" when git is not installed, `root` is
no checkout (a wheel's install, the images: the slim base has no git) or the command fails. A
benchmark records the commit and changed files when it can and never fails for want of them:
`git_output` is asked at the end of runs that may have measured for hours.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout (or, installed, site-packages/gelato)


def git_output(args: list[str], root: Path = ROOT) -> str:
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    # Only the final newline goes: `status --short` lines start with a meaningful space (" M": unstaged).
    return res.stdout.rstrip("\n") if res.returncode == 0 else ""
