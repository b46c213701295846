"""Rewrite a CUDA source of genloss (cuda/*.cu, cuda/*.cuh) into C++ that runs on the host
emulator (cuda/emulator/emulator.h, which the build force-includes):

* ``kernel<T><<<grid, block[, shmem[, stream]]>>>(args)`` becomes
  ``::genloss_emulator::launch([&]() { kernel<T>(args); }, grid, block[, shmem[, stream]])``;
* ``extern __shared__ T name[];`` becomes a pointer to the launch's dynamic shared memory;
* the CUDA toolkit's headers (runtime, fp16, bf16, CUB) are dropped: emulator.h stands in.

Lines are kept where they were (a ``#line`` directive names the original file), so a compile
error points at the .cu source. Usage: ``translate.py OUT_DIR FILE...`` (a .cu becomes
OUT_DIR/<name>.cpp, a .cuh keeps its name, so quoted includes find the translated copy).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

TOOLKIT_INCLUDE = re.compile(
    r"^\s*#\s*include\s*<(cuda_runtime\.h|cuda_fp16\.h|cuda_bf16\.h|cub/[^>]*)>.*$", re.M
)
EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")


def _template_start(s: str, end: int) -> int:
    """Index where the identifier (with template arguments) that ends just before ``end`` starts."""
    i = end
    while i > 0 and s[i - 1].isspace():
        i -= 1
    if i > 0 and s[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            if s[i] == ">":
                depth += 1
            elif s[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (s[i - 1].isalnum() or s[i - 1] in "_:"):
        i -= 1
    return i


def _close(s: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at ``i``."""
    depth = 0
    while i < len(s):
        if s[i] == open_:
            depth += 1
        elif s[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced brackets")


def translate(src: str) -> str:
    src = TOOLKIT_INCLUDE.sub("", src)
    src = EXTERN_SHARED.sub(r"\1* \2 = static_cast<\1*>(::genloss_emulator::dynamic_shared());", src)
    out, pos = [], 0
    while (k := src.find("<<<", pos)) >= 0:
        if "//" in src[src.rfind("\n", 0, k) + 1 : k]:  # in a line comment: not a launch
            out.append(src[pos : k + 3])
            pos = k + 3
            continue
        start = _template_start(src, k)
        cfg_end = src.index(">>>", k)
        p = src.index("(", cfg_end)
        q = _close(src, p, "(", ")")
        name, cfg, args = src[start:k].strip(), src[k + 3 : cfg_end], src[p + 1 : q - 1]
        out.append(src[pos:start])
        out.append(f"::genloss_emulator::launch([&]() {{ {name}({args}); }}, {cfg})")
        pos = q
    out.append(src[pos:])
    return "".join(out)


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in map(Path, argv[2:]):
        name = f.stem + ".cpp" if f.suffix == ".cu" else f.name
        text = f'#line 1 "{f.as_posix()}"\n' + translate(f.read_text())
        target = out_dir / name
        if not target.exists() or target.read_text() != text:  # unchanged: no rebuild
            target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
