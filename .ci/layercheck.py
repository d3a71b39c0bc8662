#!/usr/bin/env python3
"""Layer rules of a crate, read the way modcycles.py reads imports (`crate::name` paths and
`use crate::{a, b}` groups, a crate root's re-exports seen through, comments and unit-test
modules ignored).

Usage: layercheck.py SRC_DIR LAYER [LAYER...]
  Each LAYER is a comma-separated set of top-level modules, lowest first. A module may import
  its own layer and the layers below it, never one above ("no import back up").
Usage: layercheck.py --bin BIN_DIR MAX_LINES MAX_FN_LINES
  A binary stays thin: at most MAX_LINES lines in all, no function over MAX_FN_LINES lines.
Usage: layercheck.py --forbid DIR REGEX WHY
  No code under DIR (comments and unit tests aside) matches REGEX; WHY says which rule.
Exit 1 on any breach, naming it."""
import os, re, sys


def rust_files(d):
    for root, _, files in os.walk(d):
        for f in sorted(files):
            if f.endswith(".rs"):
                yield os.path.join(root, f)


def code_of(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    text = re.sub(r"(?s)#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", text)
    return re.sub(r"(?m)//.*$", "", text)


def fn_lengths(path):
    """(name, first line, lines) of every fn with a body, by brace matching on code."""
    lines = open(path, encoding="utf-8", errors="replace").read().split("\n")
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)", line)
        if not m:
            continue
        depth, started = 0, False
        for j in range(i, len(lines)):
            s = re.sub(r'"(\\.|[^"\\])*"', '""', lines[j])
            s = re.sub(r"'(\\.|[^'\\])'", "''", s).split("//")[0]
            if not started and ";" in s and "{" not in s:
                break
            for c in s:
                if c == "{":
                    depth, started = depth + 1, True
                elif c == "}":
                    depth -= 1
            if started and depth == 0:
                out.append((m.group(6), i + 1, j - i + 1))
                break
    return out


def check_bin(d, max_lines, max_fn):
    bad, total = [], 0
    for f in rust_files(d):
        total += sum(1 for _ in open(f, encoding="utf-8", errors="replace"))
        for name, at, n in fn_lengths(f):
            if n > max_fn:
                bad.append(f"{f}:{at}: fn {name} is {n} lines (at most {max_fn})")
    if total >= max_lines:
        bad.append(f"{d}: {total} lines (under {max_lines})")
    for b in bad:
        print(b)
    print(f"{d}: {total} lines, no fn over {max_fn} lines" if not bad else f"{len(bad)} breach(es)")
    return 1 if bad else 0


def check_layers(src, layers):
    rank = {}
    for i, layer in enumerate(layers):
        for m in layer.split(","):
            rank[m] = i
    mods = {}
    for f in rust_files(src):
        top = os.path.relpath(f, src).split(os.sep)[0].removesuffix(".rs")
        if top in ("lib", "main", "bin"):
            continue
        mods.setdefault(top, []).append(f)
    unranked = sorted(set(mods) - set(rank))
    if unranked:
        print(f"{src}: modules in no layer: {', '.join(unranked)} (add them to .ci/layers)")
        return 1
    reexport = {}
    root = os.path.join(src, "lib.rs")
    if os.path.exists(root):
        text = open(root, encoding="utf-8").read()
        for mod, names in re.findall(r"pub\s+use\s+(?:crate::|self::)?([a-z_][a-z0-9_]*)::(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)", text):
            for n in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", names):
                if mod in mods:
                    reexport[n] = mod
    bad = []
    for m, files in mods.items():
        for f in files:
            text = code_of(f)
            names = re.findall(r"crate::([A-Za-z_][A-Za-z0-9_]*)", text)
            for group in re.findall(r"use crate::\{([^}]*)\}", text):
                names += re.findall(r"(?:^|,)\s*([A-Za-z_][A-Za-z0-9_]*)", group)
            for n in names:
                n = reexport.get(n, n)
                if n in rank and rank[n] > rank[m]:
                    bad.append(f"{f}: `{m}` (layer {rank[m]}) imports `{n}` (layer {rank[n]}): an import back up")
    for b in sorted(set(bad)):
        print(b)
    print(f"{src}: {len(mods)} modules in {len(layers)} layers, {len(set(bad))} imports back up")
    return 1 if bad else 0


def check_forbid(d, pattern, why):
    bad = []
    for f in rust_files(d):
        for i, line in enumerate(code_of(f).split("\n"), 1):
            if re.search(pattern, line):
                bad.append(f"{f}:{i}: {line.strip()}  ({why})")
    for b in bad:
        print(b)
    print(f"{d}: {len(bad)} breach(es) of: {why}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "--forbid":
        sys.exit(check_forbid(sys.argv[2], sys.argv[3], sys.argv[4]))
    if sys.argv[1] == "--bin":
        sys.exit(check_bin(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    sys.exit(check_layers(sys.argv[1], sys.argv[2:]))
