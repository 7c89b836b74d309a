"""Text layer: reject banned constructs in model-written Lean before any Lean runs (prover.md §4).

Scanning happens on a copy with comments and string literals blanked (offsets kept), so a banned
word inside a comment is harmless and a banned construct cannot hide behind one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_ID_BEFORE = r"(?<![\w.'])"
_ID_AFTER = r"(?![\w'!?])"
_CMD = r"(?m)^[ \t]*(?:@\[[^\]\n]*\][ \t]*)?(?:(?:local|scoped|private|protected|noncomputable)[ \t]+)*"


def _words(*names: str) -> str:
    return _ID_BEFORE + "(?:" + "|".join(re.escape(n) for n in names) + ")" + _ID_AFTER


@dataclass(frozen=True)
class Rule:
    id: str
    pattern: str
    why: str


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("sorry", _words("sorry"), "leaves the goal unproved"),
    Rule("admit", _words("admit"), "synonym of sorry"),
    Rule("sorryAx", _words("sorryAx"), "explicit sorry axiom"),
    Rule("axiom", _words("axiom"), "declares an unchecked axiom"),
    Rule("native_decide", _words("native_decide", "ofReduceBool", "trustCompiler"),
         "trusts compiled code instead of the kernel"),
    Rule("implemented_by", _words("implemented_by", "extern"), "swaps the code native_decide runs"),
    Rule("unsafe", _words("unsafe"), "escapes the kernel's checks"),
    Rule("partial", _words("partial"), "opaque non-terminating definitions mask errors"),
    Rule("opaque", _words("opaque"), "opaque constants can smuggle values"),
    Rule("set_option debug", r"set_option\s+debug\.", "debug options such as skipKernelTC disable checking"),
    Rule("#exit", r"#exit\b", "stops elaboration before later checks"),
    Rule("#eval", r"#(?:eval|exec|reduce|print|synth|check|find|help)\b",
         "commands that run code or print instead of proving"),
    Rule("run_cmd", _words("run_cmd", "run_tac", "run_elab", "run_meta"), "runs metaprograms"),
    Rule("metaprogramming", _words("macro", "macro_rules", "elab", "elab_rules", "syntax", "notation",
                                   "infix", "infixl", "infixr", "declare_syntax_cat", "initialize",
                                   "builtin_initialize"),
         "new syntax or elaborators can hide sorry or rewrite meaning"),
    Rule("prefix/postfix notation", _CMD + r"(?:prefix|postfix)\b", "new notation"),
    Rule("meta API", r"\bLean\.(?:Elab|Meta|Environment|Kernel|Compiler)\b|" + _words(
        "addDecl", "addDeclCore", "modifyEnv", "setEnv"), "edits the environment directly"),
    Rule("instance", _words("instance"), "local instances change what the statement means"),
    Rule("attribute", r"\battribute\s*\[", "attribute changes alter simp sets and instances"),
    Rule("variable/include", _CMD + r"(?:variable|include|omit)\b", "adds hypotheses to the theorem"),
    Rule("namespace", _CMD + r"(?:namespace|export)\b|open\s+private\b|_root_",
         "namespaces can shadow names used by the statement"),
    Rule("search tactic", _ID_BEFORE + r"(?:apply|exact|rw|simp|simp_all|aesop|field_simp|norm_num|dsimp|"
         r"hint|says)\?|" + _words("library_search", "rw_search", "hint"),
         "apply? can close goals with a hidden sorry in Lean 4.9"),
)

ALLOWED_OPTIONS = ("maxHeartbeats", "maxRecDepth", "synthInstance.maxHeartbeats", "synthInstance.maxSize",
                   "linter.", "pp.")


@dataclass(frozen=True)
class Finding:
    rule: str
    line: int
    snippet: str
    why: str

    def __str__(self) -> str:
        return f"banned construct `{self.rule}` at line {self.line} ({self.why}): {self.snippet!r}"


@dataclass(frozen=True)
class GuardPolicy:
    """Which constructs are banned; `allowed` switches individual rules off by id."""

    rules: tuple[Rule, ...] = DEFAULT_RULES
    allowed: frozenset[str] = field(default_factory=frozenset)
    allowed_options: tuple[str, ...] = ALLOWED_OPTIONS

    def __post_init__(self) -> None:
        unknown = set(self.allowed) - {r.id for r in self.rules} - {"set_option"}
        if unknown:
            raise ValueError(f"unknown guard rule ids {sorted(unknown)}; known: {[r.id for r in self.rules]}")


def blank_comments_and_strings(text: str) -> str:
    """Replace comments (nested /- -/, --) and string literals by spaces, keeping newlines/offsets."""
    out = list(text)
    i, depth, n = 0, 0, len(text)

    def blank(a: int, b: int) -> None:
        for k in range(a, min(b, n)):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        if text.startswith("/-", i):
            depth += 1
            blank(i, i + 2)
            i += 2
        elif depth and text.startswith("-/", i):
            depth -= 1
            blank(i, i + 2)
            i += 2
        elif depth:
            blank(i, i + 1)
            i += 1
        elif text.startswith("--", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def scan(text: str, policy: GuardPolicy = GuardPolicy()) -> list[Finding]:
    """All banned constructs in `text` (model-written Lean), in order of appearance."""
    code = blank_comments_and_strings(text)
    findings = []

    def add(rule: str, start: int, why: str) -> None:
        line = code.count("\n", 0, start) + 1
        findings.append(Finding(rule, line, text.splitlines()[line - 1].strip()[:120], why))

    for rule in policy.rules:
        if rule.id in policy.allowed:
            continue
        for m in re.finditer(rule.pattern, code):
            add(rule.id, m.start(), rule.why)
    if "set_option" not in policy.allowed:
        for m in re.finditer(r"\bset_option\s+([\w.]+)", code):
            option = m.group(1)
            if not option.startswith("debug.") and not option.startswith(policy.allowed_options):
                add("set_option", m.start(), f"option {option} is not in the allow-list")
    return sorted(findings, key=lambda f: f.line)
