"""Text layer: reject banned constructs in model-written Lean before any Lean runs (prover.md §4).

Scanning happens on a copy with comments and literals blanked (offsets kept), so a banned word
inside a comment is harmless; text whose comments or literals could be read differently by Lean is
refused outright, so a banned construct cannot hide behind one (see `Lexed`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

@dataclass(frozen=True)
class Rule:
    """A banned construct: Lean keywords/identifiers in `words`, or a regex `pattern` over blanked code.

    A word counts wherever Lean's tokenizer would read it as its own token, i.e. anywhere except inside
    a longer identifier (`h'sorry` is a name; `sᶜinstance`, `2sorry`, `Lean.ofReduceBool` and
    `x := 1 variable` all contain the word). Commands are matched anywhere, not only at a line start,
    because Lean does not care where a command starts.
    """

    id: str
    why: str
    words: tuple[str, ...] = ()
    pattern: str = ""


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("sorry", "leaves the goal unproved", ("sorry",)),
    Rule("admit", "synonym of sorry", ("admit",)),
    Rule("sorryAx", "explicit sorry axiom", ("sorryAx",)),
    Rule("axiom", "declares an unchecked axiom", ("axiom",)),
    Rule("native_decide", "trusts compiled code instead of the kernel",
         ("native_decide", "ofReduceBool", "trustCompiler")),
    Rule("implemented_by", "swaps the code native_decide runs", ("implemented_by", "extern", "csimp")),
    Rule("unsafe", "escapes the kernel's checks; `unsafeCast`, `unsafeIO`, `ptrAddrUnsafe`... corrupt the process",
         ("ptrEq", "ptrEqList", "withPtrEq", "timeit", "allocprof"), pattern=r"[uU]nsafe"),
    Rule("partial", "opaque non-terminating definitions mask errors", ("partial",)),
    Rule("opaque", "opaque constants can smuggle values", ("opaque", "irreducible_def")),
    Rule("set_option debug", "debug options such as skipKernelTC disable checking", pattern=r"set_option\s+debug\."),
    Rule("#exit", "stops elaboration before later checks", pattern=r"#exit\b"),
    Rule("#eval", "commands that run code, print, or swallow messages instead of proving",
         pattern=r"#(?:eval|exec|reduce|print|synth|check|find|help|guard|simp|norm_num|conv|where|lint|time)\w*"),
    Rule("run_cmd", "runs metaprograms at elaboration time (`by_elab` can add unchecked declarations)",
         ("run_cmd", "run_tac", "run_elab", "run_meta", "run_conv", "by_elab", "do")),
    Rule("output", "proofs never print; printing to stdout could forge REPL responses",
         ("println!", "print!", "eprintln!", "eprint!", "dbg_trace", "panic!"), pattern=r"\bdbg[A-Z_]\w*"),
    Rule("eval%", "compiles and runs a term at elaboration time (with unsafe code allowed)", pattern=r"eval%"),
    Rule("metaprogramming", "new syntax, elaborators or unification hints can hide sorry or rewrite meaning",
         ("macro", "macro_rules", "elab", "elab_rules", "syntax", "notation", "notation3", "infix", "infixl",
          "infixr", "prefix", "postfix", "declare_syntax_cat", "initialize", "builtin_initialize", "unif_hint",
          "simproc", "dsimproc", "simproc_decl", "register_simp_attr", "declare_config_elab")),
    Rule("meta API", "the metaprogramming API edits the environment, elaborators or messages",
         ("Lean", "Elab", "Meta", "Parser", "IO", "CommandElab", "TermElab", "Tactic", "addDecl", "addDeclCore",
          "addDeclWithoutChecking", "addAndCompile", "compileDecl", "modifyEnv", "setEnv", "Environment", "CoreM",
          "MetaM", "TermElabM", "TacticM", "CommandElabM", "ST")),
    Rule("instance", "local instances change what the statement means", ("instance",)),
    Rule("attribute", "attributes register elaborators, instances and simp lemmas",
         ("attribute",), pattern=r"@\["),
    Rule("variable/include", "adds hypotheses to the theorem", ("variable", "include", "omit")),
    Rule("namespace", "namespaces can shadow names used by the statement", ("namespace", "export"),
         pattern=r"open\s+private\b|\b(?:theorem|lemma|def|abbrev|structure|class|inductive)\s+_root_"),
    Rule("quoted name", "«…» spells any name, banned ones included (`set_option «debug».skipKernelTC`)",
         pattern="«"),
    Rule("search tactic", "apply? can close goals with a hidden sorry in Lean 4.9",
         ("library_search", "rw_search"),
         pattern=r"(?<![\w.'])(?:apply|exact|rw|simp|simp_all|aesop|field_simp|norm_num|dsimp|hint|says)\?"),
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


_CHAR_LIT = re.compile(r"'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]*\}|u[0-9a-fA-F]{4}|.)|[^\\'\n])'")
_RAW_OPEN = re.compile(r'r(#*)"')
_TOKEN_START = "([{⟨,"  # always whole tokens: a `'` or `r` right after one starts a new token


@dataclass(frozen=True)
class Lexed:
    """Lean text with comments and literals blanked (offsets and newlines kept), and why it may be misread.

    The text layer and the statement pin see code only through `blanked`, so a literal read with the
    wrong extent hides real code from both (a `"` inside `'"'` once opened a fake string). The lexer
    follows Lean's tokenizer for `--`, `/- -/` (nested; `/--` and `/-!` open doc comments), `"..."`,
    `r#"..."#`, `'c'` and `«name»`, and lists as `problems` every place where its reading could still
    differ from Lean's. Callers that guard proofs refuse input with any problem (fail closed); proofs
    never need the constructs involved:
      - an unterminated comment, literal or `«name»` (everything after it would be blanked);
      - a string, character literal or `«name»` spanning a line break (Lean allows it; it is how one
        misread quote swallows whole commands);
      - `{` inside a string (`s!"{...}"` interpolation runs the code between the braces);
      - a `'c'` or `r"` right after something other than whitespace, `([{⟨,` or an identifier
        (`h'`, `x'` are names): after a number, `.` or a symbol such as `∑'` the reading depends on
        Lean's token table, which this lexer does not have.
    """

    blanked: str
    problems: tuple[tuple[int, str], ...]  # (offset, why)


def _letter_like(o: int) -> bool:
    """Lean's `isLetterLike` (v4.9): Greek except λ Π Σ, Coptic, letter-like symbols, math alphabets."""
    return ((0x3b1 <= o <= 0x3c9 and o != 0x3bb) or (0x391 <= o <= 0x3a9 and o not in (0x3a0, 0x3a3))
            or 0x3ca <= o <= 0x3fb or 0x1f00 <= o <= 0x1ffe or 0x2100 <= o <= 0x214f
            or 0x1d49c <= o <= 0x1d59f)


def _id_first(c: str) -> bool:
    """Lean's `isIdFirst`; Latin-1 letters, identifiers only in newer Lean, count as unclear."""
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or c == "_" or _letter_like(ord(c))


def _id_rest(c: str) -> bool:
    """Lean's `isIdRest`: adds digits, `'`, `!`, `?` and subscripts."""
    o = ord(c)
    return (_id_first(c) or "0" <= c <= "9" or c in "'!?" or 0x2080 <= o <= 0x209c
            or 0x1d62 <= o <= 0x1d6a)


def _boundary(text: str, i: int) -> str:
    """How Lean's tokenizer meets offset i: "start" of a token, inside an "ident", or "unclear"."""
    if i == 0 or text[i - 1] in " \t\r\n" or text[i - 1] in _TOKEN_START:
        return "start"
    j = i
    while j > 0 and _id_rest(text[j - 1]):
        j -= 1
    return "ident" if j < i and _id_first(text[j]) else "unclear"


def _block_comment_end(text: str, i: int) -> int:
    """End of the (nested) block comment opening at i, or -1; `/--` and `/-!` open as one token."""
    depth, k = 1, i + (3 if text.startswith(("/--", "/-!"), i) else 2)
    while k < len(text):
        if text.startswith("/-", k):
            depth, k = depth + 1, k + 2
        elif text.startswith("-/", k):
            depth, k = depth - 1, k + 2
            if depth == 0:
                return k
        else:
            k += 1
    return -1


def _string_end(text: str, i: int) -> int:
    """End of the string literal opening at i (backslash escapes), or -1."""
    k = i + 1
    while k < len(text) and text[k] != '"':
        k += 2 if text[k] == "\\" else 1
    return k + 1 if k < len(text) else -1


def _raw_string_end(text: str, i: int) -> int:
    """End of `r#..#"..."#..#` opening at i (no escapes; closed by a quote and as many #), or -1."""
    m = _RAW_OPEN.match(text, i)
    close = '"' + m.group(1)
    k = text.find(close, m.end())
    return k + len(close) if k >= 0 else -1


def _prefixed_literal(text: str, i: int, kind: str, end: int) -> tuple[str, int, str | None]:
    """A `'c'` or `r"..."` at i is a literal only at a token start; inside an identifier it is code."""
    where = _boundary(text, i)
    if where == "start":
        return kind, end, None
    if where == "ident":
        return "", i + 1, None
    return "", i + 1, f"{kind} after {text[i - 1]!r}: Lean's reading depends on its token table"


def _literal_at(text: str, i: int) -> tuple[str, int, str | None]:
    """(kind, end, problem) of the comment or literal starting at i; kind "" means plain code."""
    c = text[i]
    if text.startswith("/-", i):
        return "block comment", _block_comment_end(text, i), None
    if text.startswith("--", i):
        end = text.find("\n", i)
        return "line comment", len(text) if end < 0 else end, None
    if c == '"':
        return "string", _string_end(text, i), None
    if c == "«":
        end = text.find("»", i)
        return "name", end + 1 if end >= 0 else -1, None
    if c == "'" and (m := _CHAR_LIT.match(text, i)):
        return _prefixed_literal(text, i, "character literal", m.end())
    if c == "r" and _RAW_OPEN.match(text, i):
        return _prefixed_literal(text, i, "raw string", _raw_string_end(text, i))
    return "", i + 1, None


def _literal_problem(text: str, kind: str, start: int, end: int) -> str | None:
    """Why a literal that Lean and this lexer agree on is still refused (see `Lexed`)."""
    if end < 0:
        return f"unterminated {kind}"
    body = text[start:end]
    if kind in ("string", "raw string", "character literal", "name") and "\n" in body:
        return f"{kind} spans a line break"
    if kind == "string" and "{" in body:
        return "`{` in a string literal (string interpolation runs code)"
    return None


_ODD_LINE_BREAKS = re.compile("[\r\x0b\x0c\x85\u2028\u2029]")


def lex(text: str) -> Lexed:
    """Blank comments and literals the way Lean reads them, and collect what might be misread."""
    out, i = list(text), 0
    # Python's splitlines and Lean disagree on these, so line-based checks could pair the wrong lines.
    problems = [(m.start(), f"line break character {m.group()!r} (only \\n is accepted)")
                for m in _ODD_LINE_BREAKS.finditer(text)]
    while i < len(text):
        kind, end, problem = _literal_at(text, i)
        if kind:
            problem = _literal_problem(text, kind, i, end)
            end = len(text) if end < 0 else end
            if kind != "name":  # an escaped identifier is code
                for k in range(i, end):
                    if out[k] != "\n":
                        out[k] = " "
        if problem:
            problems.append((i, problem))
        i = end
    return Lexed("".join(out), tuple(sorted(problems)))


def blank_comments_and_strings(text: str) -> str:
    """Replace comments and string/char literals by spaces, keeping newlines/offsets (see `Lexed`)."""
    return lex(text).blanked


def word_hits(code: str, words: tuple[str, ...]) -> list[int]:
    """Offsets where one of `words` is a token of its own for Lean (see `Rule`)."""
    if not words:
        return []
    pattern = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return [
        m.start()
        for m in re.finditer(pattern, code)
        if _boundary(code, m.start()) != "ident" and not (m.end() < len(code) and _id_rest(code[m.end()]))
    ]


def scan(text: str, policy: GuardPolicy = GuardPolicy()) -> list[Finding]:
    """All banned constructs in `text` (model-written Lean), in order of appearance.

    Lexer problems (see `Lexed`) always count: no policy can allow text this layer may misread.
    """
    lexed = lex(text)
    code = lexed.blanked
    findings = []

    def add(rule: str, start: int, why: str) -> None:
        line = code.count("\n", 0, start) + 1
        findings.append(Finding(rule, line, text.splitlines()[line - 1].strip()[:120], why))

    for offset, why in lexed.problems:
        add("lexer", offset, why)
    for rule in policy.rules:
        if rule.id in policy.allowed:
            continue
        for start in word_hits(code, rule.words):
            add(rule.id, start, rule.why)
        if rule.pattern:
            for m in re.finditer(rule.pattern, code):
                add(rule.id, m.start(), rule.why)
    if "set_option" not in policy.allowed:
        for start in word_hits(code, ("set_option",)):
            rest = code[start + len("set_option"):].split(None, 1)
            option = rest[0] if rest else ""
            if not re.fullmatch(r"[A-Za-z_][\w.]*", option):
                add("set_option", start, f"option name {option!r} is not a plain name")
            elif not option.startswith("debug.") and not option.startswith(policy.allowed_options):
                add("set_option", start, f"option {option} is not in the allow-list")
    return sorted(findings, key=lambda f: f.line)
