#!/usr/bin/env python3
"""Find import circles between the modules of one Rust crate.

    tests/modcycles.py SRC_DIR [--root FILE] [--edges]

SRC_DIR is a crate's source folder (shim/src); its root is lib.rs, else main.rs (or --root). Exit status: 0 when
no two modules depend on each other (directly or around a circle), 1 with the circles printed, 2 on bad usage.
No dependencies beyond python3.

What a module is
    One source file is one module; its path is its file's path: `foo.rs` and `foo/mod.rs` are `foo`,
    `foo/bar.rs` is `foo::bar` (both layouts, `foo.rs` beside `foo/` or `foo/mod.rs`, are followed). Modules are
    found from the root by their `mod x;` declarations (a `#[path = "..."]` on one is honoured), so a file no
    module declares is not part of the crate. The crate root is the module `crate`. An inline module
    (`mod tests { ... }`) is part of its file's module: its references count as the file's, and `super::` in it
    means what the compiler says it means (`super::` in `foo.rs`'s `mod tests` is `foo` itself).

What an edge is: module A uses an item that module B holds
    - a path in code that starts with `crate::`, `$crate::`, `super::`, `self::` or with the name of one of A's
      own child modules (`child::f()`), e.g. `crate::b::f()`, `super::b::X`;
    - a private `use` (`use crate::b::f;`, every leaf of a group `use crate::{a, b::{c, d}};`); a `use` that
      names a module (`use crate::b;`, `use crate::{self as x}`) is not an edge by itself: the paths through it
      in code are (`b::f()`), so that a module imported but reached only through a facade's re-export points
      at the module that really holds the item;
    - a re-export (`pub use`, `pub(crate) use`...) is not a use: a folder's `mod.rs` that declares children and
      re-exports their items does not depend on them. It counts only when the module's own code names the
      re-exported item as well.
    Not edges: `mod x;` declarations, visibility paths (`pub(in crate::x)`), paths inside comments and strings,
    paths into other crates (`vos::sys`, `::core`).
    A path is resolved to the deepest module it names (`crate::b::c::f` is `b::c` when `b/c.rs` exists), and a
    name a module only re-exports (`crate::b::f` with `pub use self::inner::f;` in `b`, or `pub use inner::*`
    when `inner` defines `f`) resolves to the module that holds it. A module's references to itself, and to
    modules of other crates, are dropped.
    An edge to a module's own child, and from a child to its parent (`super::X`, `crate::parent::X`), counts like
    any other: a parent holding helpers its children call must not call back into those children.

What a circle is
    A set of modules that reference each other's items: a strongly connected component of the graph with more than
    one module. Each is printed with its edges and the first place each edge is made, so the reference to move is
    easy to find. `--edges` prints the whole graph.
"""

import os
import re
import signal
import sys

IDENT = re.compile(r"\$?[A-Za-z_][A-Za-z0-9_]*|r#[A-Za-z_][A-Za-z0-9_]*")
RAW_STRING = re.compile(r'(?:b|c)?r(#*)"')
KEYWORDS_ITEM = {"fn", "struct", "enum", "union", "trait", "type", "static", "const", "mod"}


class Tok:
    __slots__ = ("text", "line", "string")

    def __init__(self, text, line, string=None):
        self.text, self.line, self.string = text, line, string

    def __repr__(self):
        return f"{self.text}@{self.line}"


def tokenize(src):
    """Rust source to tokens: identifiers, `::`, single punctuation; comments dropped, string literals as one
    token `"` carrying their text (for `#[path = "..."]`)."""
    toks, i, n, line = [], 0, len(src), 1
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += src[i] == "\n"
                    i += 1
        elif c == '"' or ((c in "rbc") and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_"))
                          and RAW_STRING.match(src, i)):
            start_line = line
            m = RAW_STRING.match(src, i) if c != '"' else None
            if m:
                end = '"' + m.group(1)
                j = src.find(end, m.end())
                j = n if j < 0 else j
                text, i = src[m.end():j], j + len(end)
            else:
                j = i + 1
                while j < n and src[j] != '"':
                    j += 2 if src[j] == "\\" else 1
                text, i = src[i + 1:j], j + 1
            line += text.count("\n")
            toks.append(Tok('"', start_line, text))
        elif c == "'":
            # A char literal ('x', '\n', '\u{..}') or a lifetime/label ('a).
            if i + 1 < n and src[i + 1] == "\\":
                j = i + 2
                while j < n and src[j] != "'":
                    j += 2 if src[j] == "\\" else 1
                i = j + 1
            elif i + 2 < n and src[i + 2] == "'":
                i += 3
            else:
                i += 1
        elif src.startswith("::", i):
            toks.append(Tok("::", line))
            i += 2
        else:
            m = IDENT.match(src, i)
            if m:
                toks.append(Tok(m.group(0), line))
                i = m.end()
            else:
                toks.append(Tok(c, line))
                i += 1
    return toks


class Module:
    def __init__(self, path, file):
        self.path = path          # tuple of names; () is the crate root
        self.file = file
        self.children = {}        # name -> Module (file modules declared here)
        self.inline = set()       # paths of inline modules in this file
        self.uses = []            # (scope, segments, alias, is_pub, line, glob)
        self.code_paths = []      # (scope, segments, line)
        self.code_idents = set()  # identifiers in code (outside `use` items)
        self.defines = set()      # names of items defined here


def name(path):
    return "crate" if not path else "::".join(path)


def split_use_tree(toks, i, prefix, out):
    """Parse a use tree at toks[i]; append (segments, alias, glob) leaves to out; return the index after it."""
    segs = list(prefix)
    while i < len(toks):
        t = toks[i].text
        if t == "{":
            i += 1
            while i < len(toks) and toks[i].text != "}":
                i = split_use_tree(toks, i, segs, out)
                if i < len(toks) and toks[i].text == ",":
                    i += 1
            return i + 1
        if t == "*":
            out.append((segs, None, True))
            return i + 1
        if t == "::":
            i += 1
            continue
        if IDENT.fullmatch(t):
            segs = segs + [t]
            i += 1
            if i < len(toks) and toks[i].text == "::":
                continue
            alias = None
            if i + 1 < len(toks) and toks[i].text == "as":
                alias = toks[i + 1].text
                i += 2
            out.append((segs, alias, False))
            return i
        return i
    return i


def parse_module(mod, toks, declare_child):
    """Fill `mod` from its file's tokens. `declare_child(scope, name, path_attr)` is called for each `mod x;`."""
    scope_stack = [(mod.path, None)]  # (module path, brace depth that closes it)
    depth = 0
    path_attr = None
    i = 0
    n = len(toks)
    while i < n:
        t = toks[i].text
        scope = scope_stack[-1][0]
        if t == "{":
            depth += 1
        elif t == "}":
            if scope_stack[-1][1] == depth:
                scope_stack.pop()
            depth -= 1
        elif t == "#" and i + 1 < n and toks[i + 1].text in ("[", "!"):
            # An attribute: `#[path = "..."]` is remembered for the next `mod x;`.
            j = i + 1 if toks[i + 1].text == "[" else i + 2
            k, level = j, 0
            while k < n:
                if toks[k].text == "[":
                    level += 1
                elif toks[k].text == "]":
                    level -= 1
                    if level == 0:
                        break
                k += 1
            body = toks[j + 1:k]
            if len(body) == 3 and body[0].text == "path" and body[1].text == "=" and body[2].text == '"':
                path_attr = body[2].string
                i = k + 1
                continue
            # Any other attribute is read as code: it may name this crate's items (`#[derive(crate::X)]`).
            i += 1
            continue
        elif t == "pub" and i + 1 < n and toks[i + 1].text == "(":
            # Visibility: pub(crate), pub(super), pub(in path): no reference.
            k = i + 1
            while k < n and toks[k].text != ")":
                k += 1
            toks_after = k + 1
            if toks_after < n and toks[toks_after].text == "use":
                i = parse_use(mod, toks, toks_after, scope, True)
            else:
                i = toks_after
            continue
        elif t == "pub" and i + 1 < n and toks[i + 1].text == "use":
            i = parse_use(mod, toks, i + 1, scope, True)
            continue
        elif t == "use" and (i == 0 or toks[i - 1].text not in ("::", ".")):
            i = parse_use(mod, toks, i, scope, False)
            continue
        elif t == "mod" and i + 2 < n and IDENT.fullmatch(toks[i + 1].text):
            child = toks[i + 1].text.removeprefix("r#")
            if toks[i + 2].text == ";":
                declare_child(scope, child, path_attr)
                if scope == mod.path:
                    mod.defines.add(child)
                path_attr = None
                i += 3
                continue
            if toks[i + 2].text == "{":
                inner = scope + (child,)
                mod.inline.add(inner)
                if scope == mod.path:
                    mod.defines.add(child)
                depth += 1
                scope_stack.append((inner, depth))
                path_attr = None
                i += 3
                continue
        elif t in KEYWORDS_ITEM and i + 1 < n and IDENT.fullmatch(toks[i + 1].text) and scope == mod.path:
            nm = toks[i + 1].text
            if t == "static" and nm == "mut" and i + 2 < n:
                nm = toks[i + 2].text
            mod.defines.add(nm.removeprefix("r#"))
        elif t == "macro_rules" and i + 2 < n and toks[i + 1].text == "!" and scope == mod.path:
            mod.defines.add(toks[i + 2].text)
        if IDENT.fullmatch(t) and (i == 0 or toks[i - 1].text not in ("::", ".")):
            mod.code_idents.add(t)
            if i + 1 < n and toks[i + 1].text == "::":
                segs, k = [t], i + 1
                while k + 1 < n and toks[k].text == "::" and IDENT.fullmatch(toks[k + 1].text):
                    segs.append(toks[k + 1].text)
                    k += 2
                mod.code_paths.append((scope, segs, toks[i].line))
                for s in segs[1:]:
                    mod.code_idents.add(s)
                i = k
                continue
        i += 1


def parse_use(mod, toks, i, scope, is_pub):
    """`use` at toks[i]: record its leaves; return the index after its `;`."""
    line = toks[i].line
    leaves = []
    j = split_use_tree(toks, i + 1, [], leaves)
    while j < len(toks) and toks[j].text != ";":
        j += 1
    for segs, alias, glob in leaves:
        if segs and segs[-1] == "self" and len(segs) > 1:
            segs = segs[:-1]
        mod.uses.append((scope, segs, alias, is_pub, line, glob))
    return j + 1


class Crate:
    def __init__(self, src, root_file):
        self.src = src
        self.modules = {}   # path -> Module (file modules)
        self.owner = {}     # path (file or inline module) -> file Module path
        self.load((), root_file)

    def load(self, path, file):
        mod = Module(path, file)
        self.modules[path] = mod
        self.owner[path] = path
        with open(file, encoding="utf-8", errors="replace") as f:
            toks = tokenize(f.read())
        base = os.path.dirname(file)
        stem = os.path.splitext(os.path.basename(file))[0]
        # Children of a mod.rs/lib.rs/main.rs live beside it; those of foo.rs in foo/.
        own_dir = base if (stem in ("mod", "lib", "main") or not path) else os.path.join(base, stem)
        pending = []

        def declare(scope, child, path_attr):
            sub = scope[len(path):]
            if path_attr is not None and not sub:
                candidates = [os.path.join(base, path_attr)]
            else:
                d = os.path.join(own_dir, *sub)
                if path_attr is not None:
                    candidates = [os.path.join(d, path_attr)]
                else:
                    candidates = [os.path.join(d, child + ".rs"), os.path.join(d, child, "mod.rs")]
            for c in candidates:
                if os.path.isfile(c):
                    pending.append((scope + (child,), c))
                    return
            print(f"warning: {name(scope + (child,))}: no file for `mod {child};` in {file}", file=sys.stderr)

        parse_module(mod, toks, declare)
        for p in mod.inline:
            self.owner[p] = path
        for child_path, child_file in pending:
            if child_path[:-1] == path:
                mod.children[child_path[-1]] = child_path
            self.load(child_path, child_file)

    def absolute(self, scope, segs):
        """Segments of a path as written in `scope` to an absolute module-relative list, or None (another crate)."""
        first = segs[0]
        if first in ("crate", "$crate"):
            return list(segs[1:])
        if first in ("self", "super"):
            cur = list(scope)
            k = 0
            while k < len(segs) and segs[k] in ("self", "super"):
                if segs[k] == "super":
                    if not cur:
                        return None
                    cur.pop()
                k += 1
            return cur + list(segs[k:])
        # A name in scope: a child module declared here (file or inline).
        child = tuple(scope) + (first,)
        if child in self.owner:
            return list(child) + list(segs[1:])
        return None

    def resolve(self, segs, depth=0):
        """Absolute segments to (file module path, item name or None)."""
        best = ()
        for k in range(len(segs), -1, -1):
            if tuple(segs[:k]) in self.owner:
                best = tuple(segs[:k])
                break
        rest = segs[len(best):]
        file_mod = self.owner[best]
        if rest and depth < 16:
            target = self.reexport(best, rest[0], depth)
            if target is not None:
                return self.resolve(target + rest[1:], depth + 1)
        return file_mod, (rest[0] if rest else None)

    def reexport(self, scope, item, depth):
        """Where `item`, named through module `scope`, really is: the absolute path of its import, or None."""
        mod = self.modules[self.owner[scope]]
        if scope == mod.path and item in mod.defines:
            return None
        for s, segs, alias, _is_pub, _line, glob in mod.uses:
            if s != scope or glob or not segs:
                continue
            bound = alias or segs[-1]
            if bound == item and bound != "_":
                return self.absolute(s, segs)
        for s, segs, _alias, _is_pub, _line, glob in mod.uses:
            if s != scope or not glob:
                continue
            target = self.absolute(s, segs) if segs else None
            if target is None:
                continue
            tpath = tuple(target)
            if tpath in self.modules and item in self.modules[tpath].defines:
                return target + [item]
        return None

    def edges(self):
        """{(from, to): (file, line, text)}: the first place each edge is made."""
        out = {}

        def add(mod, target, line, text):
            if target is None:
                return
            to, _ = self.resolve(target)
            if to != mod.path:
                out.setdefault((mod.path, to), (mod.file, line, text))

        for mod in self.modules.values():
            module_aliases = {}
            for scope, segs, alias, is_pub, line, glob in mod.uses:
                if not segs:
                    continue
                target = self.absolute(scope, segs)
                if target is None:
                    continue
                text = "use " + "::".join(segs) + ("::*" if glob else "")
                if glob:
                    if not is_pub:
                        add(mod, target, line, text)
                    continue
                bound = alias or segs[-1]
                if tuple(target) in self.owner:
                    # A module imported by name: the paths through it are the references.
                    module_aliases[(scope, bound)] = target
                    continue
                if not is_pub or bound in mod.code_idents:
                    add(mod, target, line, text)
            for scope, segs, line in mod.code_paths:
                target = self.absolute(scope, segs)
                if target is None and (scope, segs[0]) in module_aliases:
                    target = module_aliases[(scope, segs[0])] + list(segs[1:])
                add(mod, target, line, "::".join(segs))
        return out


def sccs(nodes, edges):
    """Tarjan's strongly connected components."""
    succ = {v: [] for v in nodes}
    for a, b in edges:
        succ[a].append(b)
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return comps


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    flags = [a for a in argv[1:] if a.startswith("--")]
    root = None
    if "--root" in argv:
        k = argv.index("--root")
        if k + 1 >= len(argv):
            print(__doc__, file=sys.stderr)
            return 2
        root = argv[k + 1]
        args = [a for a in args if a != root]
    if len(args) != 1 or any(f not in ("--edges", "--root") for f in flags):
        print(__doc__, file=sys.stderr)
        return 2
    src = args[0]
    if root is None:
        for r in ("lib.rs", "main.rs"):
            if os.path.isfile(os.path.join(src, r)):
                root = os.path.join(src, r)
                break
    if root is None or not os.path.isfile(root):
        print(f"{src}: no lib.rs or main.rs (give --root FILE)", file=sys.stderr)
        return 2
    crate = Crate(src, root)
    edges = crate.edges()
    rel = lambda f: os.path.relpath(f, src)
    if "--edges" in flags:
        for (a, b), (f, line, text) in sorted(edges.items()):
            print(f"{name(a)} -> {name(b)}    {rel(f)}:{line}  {text}")
    cycles = [sorted(c) for c in sccs(crate.modules.keys(), edges.keys()) if len(c) > 1]
    if not cycles:
        print(f"{src}: no circles among {len(crate.modules)} modules ({len(edges)} edges)")
        return 0
    cycles.sort()
    print(f"{src}: {len(cycles)} circle(s) among {len(crate.modules)} modules")
    for k, comp in enumerate(cycles, 1):
        members = set(comp)
        print(f"circle {k}: {', '.join(name(m) for m in comp)}")
        for (a, b), (f, line, text) in sorted(edges.items()):
            if a in members and b in members:
                print(f"    {name(a)} -> {name(b)}    {rel(f)}:{line}  {text}")
    return 1


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main(sys.argv))
