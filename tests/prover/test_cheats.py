"""Acceptance 4: every cheat of prover.md §4 is refused, by the layer the table names."""
from __future__ import annotations

import pytest

from prover.checker import CheckConfig, Checker
from prover.dataset import DEFAULT_HEADER, Problem, load_minif2f
from prover.kimina import KiminaBackend, KiminaConfig
from prover.pinning import Candidate, PinError, pin
from prover.textguard import GuardPolicy, blank_comments_and_strings, lex, scan
from prover.verdict import Status

STATEMENT = "theorem t (x : ℝ) (h : 2 * x = 4) : x = 2 := by\n"
PROBLEM = Problem("t", "test", DEFAULT_HEADER, "", STATEMENT)


def file(*body: str, before: str = "") -> Candidate:
    """A whole-file model output: header, optional commands before the theorem, the theorem, its proof."""
    return Candidate(DEFAULT_HEADER + before + STATEMENT + "".join(f"  {b}\n" for b in body), "file")


def completion(text: str) -> Candidate:
    return Candidate(text, "completion")


# (table row, candidate, layer that must refuse it with the default policy)
CHEATS = [
    (1, file("sorry"), "text"),
    (2, file("admit"), "text"),
    (3, file("exact sorryAx _ false"), "text"),
    (4, completion("  exact magic _\n\naxiom magic : ∀ p : Prop, p\n"), "text"),
    (5, file("have : 2 ^ 61 % 7 = 2 := by native_decide", "linarith"), "text"),
    (6, completion("  have hb : b () = false := by\n    simp [b]\n  linarith\n\n"
                   "@[implemented_by lieImpl] def b (_ : Unit) : Bool := true\n"), "text"),
    (7, completion("  linarith\n\n#eval show Lean.Elab.Command.CommandElabM Unit from do\n"
                   "  Lean.modifyEnv fun env => env\n"), "text"),
    (8, completion("  set_option debug.skipKernelTC true in\n  linarith\n"), "text"),
    (9, file("finish", before='macro "finish" : tactic => `(tactic| sorry)\n'), "pin"),
    (10, file("apply?"), "text"),
    (11, Candidate(DEFAULT_HEADER + "theorem t' (x : ℝ) (h : 2 * x = 4) : x = 2 := by\n  linarith\n", "file"), "pin"),
    (12, file("linarith", before="namespace X\ndef Real.sqrt (x : ℝ) : ℝ := x\n"), "pin"),
    (13, file("linarith", before="local instance : Add ℕ := ⟨Nat.mul⟩\n"), "pin"),
    (14, completion("  linarith\n#exit\n"), "text"),
    (15, completion("  linarith\n\ndef f : ℕ → ℕ\n  | n => f (n + 1)\ndecreasing_by sorry\n"), "text"),
    (16, completion("  linarith\n\npartial def loop (n : ℕ) : ℕ := loop n\n"), "text"),
    (17, completion("  linarith\n\n#eval Lean.modifyEnv fun env => env\n"), "text"),
    (18, file("exact hbad.elim", before="variable (hbad : False)\ninclude hbad\n"), "pin"),
    (20, file("-- FAKE: sleep 30", "decide"), "timeout"),
]


@pytest.fixture
def checker(make_pool):
    return Checker(make_pool(), CheckConfig(timeout=2.0))


@pytest.mark.parametrize("row,candidate,layer", CHEATS, ids=[f"cheat{r}" for r, _, _ in CHEATS])
def test_cheat_is_refused_by_the_named_layer(checker, row, candidate, layer):
    verdict = checker.check(PROBLEM, candidate).verdict
    assert not verdict.complete
    if layer == "timeout":
        assert verdict.status is Status.TIMEOUT
    else:
        assert verdict.status is Status.REJECTED and verdict.reason.startswith(layer + ":"), verdict.reason


def test_cheat_19_statement_bugs_are_handled_by_the_variant(shared_dir):
    """Row 19 is not a cheat but a statement bug: the rectified set fixes it and runs record the variant."""
    v15 = {p.name: p for p in load_minif2f("deepseek_v15", "test")}
    fixed = {p.name: p for p in load_minif2f("goedel_v2_rectified", "test")}
    assert "(n : ℕ)" in v15["mathd_algebra_314"].formal_statement
    assert v15["mathd_algebra_314"].formal_statement != fixed["mathd_algebra_314"].formal_statement
    assert sum(v15[n].formal_statement != fixed[n].formal_statement for n in v15) == 15


# Without the text layer, the audit and the sorry checks still refuse these (raw files, no pinning).
AUDITED = {
    3: ("  exact sorryAx _ false\n", "", Status.SORRY),
    4: ("  exact magic _\n", "axiom magic : ∀ p : Prop, p\n\n", Status.REJECTED),
    5: ("  have : 2 ^ 61 % 7 = 2 := by native_decide\n  linarith\n", "", Status.REJECTED),
    6: ("  have hb : b () = false := by native_decide\n  linarith\n",
        "def lieImpl (_ : Unit) : Bool := false\n@[implemented_by lieImpl] def b (_ : Unit) : Bool := true\n\n",
        Status.REJECTED),
    9: ("  finish\n", 'macro "finish" : tactic => `(tactic| sorry)\n\n', Status.SORRY),
    10: ("  apply?\n", "", Status.REJECTED),
    1: ("  sorry\n", "", Status.SORRY),
    2: ("  admit\n", "", Status.SORRY),
    15: ("  linarith\n\ndef f : ℕ → ℕ\n  | n => f (n + 1)\ndecreasing_by sorry\n", "", Status.SORRY),
}


@pytest.mark.parametrize("row", sorted(AUDITED), ids=[f"cheat{r}" for r in sorted(AUDITED)])
def test_second_layer_refuses_without_text_layer(checker, row):
    proof, before, status = AUDITED[row]
    code = DEFAULT_HEADER + before + STATEMENT + proof
    verdict = checker.check_code(code, "t")
    assert verdict.status is status, verdict.reason
    if status is Status.REJECTED:
        assert verdict.reason.startswith("audit:")


@pytest.mark.parametrize("row", [4, 5, 6, 10])
def test_naive_check_would_have_accepted(make_pool, row):
    """Why the audit exists: these pass a check that only looks at errors and sorries."""
    proof, before, _ = AUDITED[row]
    verdict = make_pool().verify(DEFAULT_HEADER + before + STATEMENT + proof, timeout=5, theorem="t")
    assert verdict.status is Status.COMPLETE and not set(verdict.axioms) <= {"propext", "Classical.choice",
                                                                            "Quot.sound"}


def test_cheat_7_is_invisible_to_the_audit_so_the_text_layer_must_catch_it(checker):
    """Environment hacking leaves `#print axioms` clean (needs kernel replay); only the text layer sees it."""
    code = DEFAULT_HEADER + "#eval addDeclCore ff\n\n" + STATEMENT + "  exact ff.elim\n"
    assert checker.check_code(code, "t").status is Status.COMPLETE
    assert checker.check(PROBLEM, Candidate(code, "file")).verdict.status is Status.REJECTED


def test_cheat_14_exit_fails_closed_when_audit_is_appended(kimina_server):
    """Kimina has no env reuse, so the audit is appended; `#exit` swallows it and the audit fails closed."""
    url, _ = kimina_server
    checker = Checker(KiminaBackend(KiminaConfig(url)), CheckConfig(timeout=10, guard=GuardPolicy(
        allowed=frozenset({"#exit"}))))
    verdict = checker.check(PROBLEM, completion("  linarith\n#exit\n")).verdict
    assert verdict.status is Status.REJECTED and "fail closed" in verdict.reason
    assert checker.check(PROBLEM, file("linarith")).verdict.complete


def test_changed_hypotheses_are_replaced_by_the_reference_statement():
    cand = Candidate(DEFAULT_HEADER + "theorem t (x : ℝ) (h : 2 * x = 4) (hx : x = 2) : x = 2 := by\n  exact hx\n",
                     "file")
    code = pin(PROBLEM, cand).code
    assert STATEMENT.rstrip() in code and "(hx : x = 2)" not in code


def test_comment_cannot_hide_or_trigger_a_ban(checker):
    ok = checker.check(PROBLEM, file("-- no sorry here, and /- admit -/ neither", "linarith"))
    assert ok.verdict.complete
    sneaky = checker.check(PROBLEM, file('have s := "-- "', "sorry"))
    assert sneaky.verdict.reason.startswith("text:")


def test_rules_are_configurable(checker):
    policy = GuardPolicy(allowed=frozenset({"native_decide"}))
    lenient = Checker(checker.backend, CheckConfig(timeout=2.0, guard=policy,
                                                   allowed_axioms=frozenset({"propext", "Classical.choice",
                                                                             "Quot.sound", "Lean.ofReduceBool"})))
    assert lenient.check(PROBLEM, file("have : 2 ^ 61 % 7 = 2 := by native_decide", "linarith")).verdict.complete
    with pytest.raises(ValueError, match="unknown guard rule"):
        GuardPolicy(allowed=frozenset({"no_such_rule"}))


# G1: literals the lexer must read like Lean does, or refuse (see textguard.lex).
SMUGGLED = ("#eval show Lean.Elab.Command.CommandElabM Unit from Lean.modifyEnv fun env => env\n"
            "set_option debug.skipKernelTC true\n"
            "local instance : Add ℕ := ⟨Nat.mul⟩\n")
QUOTE_CHAR_SMUGGLE = ("lemma aux1 : ('\"').toNat = 34 := by decide\n" + SMUGGLED
                      + "lemma aux2 : ('\"').toNat = 34 := by decide\n\n")
RAW_STRING_SMUGGLE = ('lemma aux1 : r#"a"b"#.length = 3 := by decide\n' + SMUGGLED
                      + 'lemma aux2 : r#"c"d"#.length = 3 := by decide\n\n')


@pytest.mark.parametrize("before", [QUOTE_CHAR_SMUGGLE, RAW_STRING_SMUGGLE], ids=["char", "raw"])
def test_literals_cannot_hide_commands_from_pin_and_text_layer(checker, before):
    cand = file("linarith", before=before)
    with pytest.raises(PinError, match="not allowed"):
        pin(PROBLEM, cand)
    rules = {f.rule for f in scan(cand.text)}
    assert {"#eval", "meta API", "set_option debug", "instance"} <= rules
    assert checker.check(PROBLEM, cand).verdict.reason.startswith("pin:")


@pytest.mark.parametrize("proof", [
    "exact (r\"\\\").length = 1 |>.elim\n  #eval Lean.modifyEnv fun env => env -- \"",
    "have : ('\"').toNat = 34 := by decide\n  set_option debug.skipKernelTC true in\n  exact ('\"').elim",
])
def test_literals_cannot_hide_code_in_a_completion(checker, proof):
    verdict = checker.check(PROBLEM, completion("  " + proof + "\n")).verdict
    assert verdict.status is Status.REJECTED and verdict.reason.startswith("text:"), verdict.reason


def test_doc_comment_opener_is_not_closed_by_its_own_dash():
    """`/--/` opens a doc comment in Lean; reading `-/` inside it as a close would expose the wrong text."""
    text = '/--/ " -/\n#eval 1\n-- "\n'
    assert "#eval" in blank_comments_and_strings(text)
    assert [f.rule for f in scan(text)] == ["#eval"]


@pytest.mark.parametrize("text,why", [
    ('have : "ab\ncd".length = 5 := rfl', "line break"),
    ("have : 'a'.toNat = 97 := by decide /- open", "unterminated"),
    ('have := s!"{show False from sorry}"', "interpolat"),
    ("exact (2'-'-'\"').elim", "character literal"),
    ("exact (sᶜ'\"').elim", "character literal"),  # `ᶜ` is a token, not part of the name `s`
    ('exact (x.r"a\\" b").elim', "raw string"),
    ("exact «x\"y", "unterminated"),
])
def test_lexer_fails_closed_on_what_it_might_misread(text, why):
    findings = scan(text)
    assert findings and findings[0].rule == "lexer" and why in findings[0].why, findings
    with pytest.raises(PinError, match=why):
        pin(PROBLEM, file(text))


def test_primes_chars_and_strings_in_legit_code_pass(checker):
    helper = "lemma aux (x' : ℝ) (h' : 2 * x' = 4) : x' = 2 := by\n  linarith\n\n"
    cand = file("have h'' := h", "have c : 'a'.toNat = 97 := by decide", "have n : '\\n'.toNat = 10 := by decide",
                "have s : \"it's -- /- x'\".length = 13 := by decide", "exact aux x h''", before=helper)
    assert scan(cand.text) == []
    assert checker.check(PROBLEM, cand).verdict.complete


def test_mathlib_primed_notation_is_code_not_a_literal():
    text = "∑' i, f i = f '' s ∪ g ⁻¹' t ∧ h' x' = 'x' ∧ r#\"q\"#.length = 1 ∧ ('\\x41', '\\u{3b1}') = p"
    blanked = blank_comments_and_strings(text)
    assert blanked.startswith("∑' i, f i = f '' s ∪ g ⁻¹' t ∧ h' x' =     ∧ ")
    assert "'" not in blanked[text.index("∧ r#"):] and "q" not in blanked
    assert lex(text).problems == ()


FAKE_AUDIT = ("theorem aux : True := trivial\n  open Lean Elab Command in\n"
              "  @[command_elab Lean.Parser.Command.printAxioms] def fakeAudit : CommandElab := fun _ =>\n"
              "    logInfo \"'t' does not depend on any axioms\"\n")


@pytest.mark.parametrize("candidate,rule", [
    # a same-file command elaborator that skips the theorem and fakes the `#print axioms` audit
    (file("linarith", before=FAKE_AUDIT), "meta API"),
    (completion("  linarith\n\n@[command_elab Parser.Command.printAxioms] def f : CommandElab := fun _ => pure ()\n"),
     "attribute"),
    # a command after a term on the same line (Lean needs no line break between commands)
    (file("exact hbad.elim", before="theorem aux : True := trivial variable (hbad : False)\n"), "variable/include"),
    (file("linarith", before="theorem aux : True := trivial namespace Real\n"), "namespace"),
    # `ᶜ` is a token of its own for Lean, so `instance` after it is the keyword (Python's \w disagrees)
    (file("simp at h ⊢", before="theorem aux (s : Set ℕ) : sᶜ = sᶜ := Eq.refl sᶜinstance (n : ℕ) : OfNat ℝ n := ⟨0⟩\n"),
     "instance"),
    (completion("  exact absurd h (by native_decide)\n  exact (2sorry)\n"), "sorry"),
    # qualified names are still the banned constant
    (completion("  exact of_decide_eq_true (Lean.ofReduceBool _ true rfl)\n"), "native_decide"),
    (completion("  linarith\n\nnotation3 \"foo\" => (1 : ℝ)\n"), "metaprogramming"),
    (completion("  linarith\n\n/-- error: x -/\n#guard_msgs in\nexample : False := by simp\n"), "#eval"),
])
def test_commands_count_wherever_lean_reads_them(checker, candidate, rule):
    text = candidate.text if candidate.kind == "file" else STATEMENT + candidate.text
    assert rule in {f.rule for f in scan(text)}
    assert not checker.check(PROBLEM, candidate).verdict.complete


def test_root_namespace_in_terms_is_allowed_but_not_in_declaration_names(checker):
    ok = file("have := _root_.pow_le_pow_left (by norm_num : (0 : ℝ) ≤ 1) (le_refl 1) 2", "linarith")
    assert scan(ok.text) == []
    assert {f.rule for f in scan("theorem _root_.Real.sqrt_eq : True := trivial")} == {"namespace"}


def test_quoted_option_names_cannot_switch_off_the_kernel(checker):
    before = "theorem aux : True := trivial\n  set_option «debug».skipKernelTC true in\n\n"
    with pytest.raises(PinError, match="set_option"):
        pin(PROBLEM, file("linarith", before=before))
    rules = {f.rule for f in scan("  set_option «debug».skipKernelTC true in\n  linarith\n")}
    assert {"quoted name", "set_option"} <= rules
    sneaky = completion("  set_option «debug».skipKernelTC true in\n  linarith\n")
    assert not checker.check(PROBLEM, sneaky).verdict.complete


@pytest.mark.parametrize("inside", ["  open scoped Classical in", "  noncomputable def f : ℕ := 1", "  section",
                                    "  universe u", "  class Cheat extends OfNat ℝ 65", "  open Real renaming pi → p"])
def test_commands_inside_a_helper_cannot_reach_the_statement(inside):
    with pytest.raises(PinError, match="command before the theorem"):
        pin(PROBLEM, file("linarith", before=f"theorem aux : True := by\n  trivial\n{inside}\n\n"))


@pytest.mark.parametrize("brk", ["\r", "\x0b", "\x0c", "\x85", "\u2028", "\u2029"])
def test_line_breaks_other_than_newline_are_refused(brk):
    text = f"-- note{brk}#eval 1\n  linarith\n"
    assert [f.rule for f in scan(text)][0] == "lexer"
    with pytest.raises(PinError, match="line break"):
        pin(PROBLEM, file("linarith", before=f"theorem aux : True := trivial -- c{brk}\n\n"))


def test_common_hypothesis_names_are_not_search_tactics(checker):
    cand = file("have hint : (0 : ℝ) < 2 := by norm_num", "linarith")
    assert scan(cand.text) == [] and checker.check(PROBLEM, cand).verdict.complete


BY_ELAB = ("have hf : False := (by_elab fun _ _ _ _ _ _ csr => do\n"
           "    let s ← csr.get\n"
           "    match s.env.addDeclWithoutChecking (.thmDecl { name := `cheat, levelParams := [],\n"
           "        type := .const ``False [], value := .const ``True.intro [] }) with\n"
           "    | .ok e => csr.set { s with env := e }\n"
           "    | .error _ => pure ()\n"
           "    pure (.const `cheat []) : False)\n")


@pytest.mark.parametrize("candidate", [
    completion("  " + BY_ELAB + "  exact hf.elim\n"),
    file("exact cheat.elim", before="theorem aux : True := by\n  " + BY_ELAB.replace("\n", "\n  ") + "  trivial\n\n"),
])
def test_term_mode_metaprograms_cannot_add_unchecked_declarations(checker, candidate):
    """Third red-team round: `by_elab` runs code that adds `cheat : False` without the kernel; the audit of
    the theorem then finds only `cheat`'s stored (checked-by-nobody) value and no axioms."""
    text = candidate.text if candidate.kind == "file" else STATEMENT + candidate.text
    assert {"run_cmd", "meta API"} <= {f.rule for f in scan(text)}
    assert not checker.check(PROBLEM, candidate).verdict.complete


def test_conv_mode_metaprograms_and_printing_are_refused(checker):
    """Fourth red-team round: Mathlib's `run_conv` takes a do-block without the words `do` or `run_tac`."""
    run_conv = ("  have hf : False := by\n    conv =>\n      run_conv\n        let g := (← get).goals.head!\n"
                "        pure ()\n    all_goals linarith\n  linarith\n")
    assert "run_cmd" in {f.rule for f in scan(STATEMENT + run_conv)}
    assert not checker.check(PROBLEM, completion(run_conv)).verdict.complete
    assert {f.rule for f in scan("  println! (String.mk ['{'])\n")} == {"output"}


@pytest.mark.parametrize("text,rule", [
    ("  have : (2 : ℕ) ^ 10 = 1024 := eval% (2 : ℕ) ^ 10\n", "eval%"),
    ("  have := eval% (unsafeCast (0 : ℕ) : ℕ)\n", "unsafe"),
    ("  simp (config := { maxSteps := (match unsafeIO (pure ()) with | _ => 100000) })\n", "unsafe"),
    ("  have := dbgTraceVal 3\n", "output"),
    ("  have := timeit \"x\" (pure ())\n", "unsafe"),
])
def test_elaboration_time_evaluation_is_refused(text, rule):
    """Fifth red-team round: `eval%` and tactic configs run terms with unsafe code allowed."""
    assert rule in {f.rule for f in scan(text)}


UNPINNED_THEOREM = "theorem t : False := by\n  exact cheat\n"


@pytest.mark.parametrize("imports", [
    # Lean's header is `import` tokens only; the first other token starts the commands, on the same line too
    "import Mathlib axiom cheat : False " + FAKE_AUDIT.replace("\n", " ") + "\n",
    # `\r` is whitespace for Lean but not a line break for the header split
    "import Mathlib\raxiom cheat : False\n",
    # an import line that opens a comment closed on a later `import` line, then code on that line
    "import Mathlib /-\nimport Aesop -/ axiom cheat : False\n",
])
def test_code_on_import_lines_is_not_trusted_as_header(checker, imports):
    """Sixth red-team round: `check_unpinned` scanned only what follows the import lines and the pool sent
    those lines to Lean as the header command, so code after `import X` on the same line ran unscanned
    (here an axiom and a command elaborator that fakes the audit)."""
    code = imports + "\n" + UNPINNED_THEOREM
    verdict = checker.check_unpinned(code, "t")
    assert verdict.status is Status.REJECTED and verdict.reason.startswith("text:"), verdict.reason


def test_plain_import_lines_still_form_the_header(checker):
    code = "import Mathlib\nimport Mathlib.Tactic.Linarith  \n\ntheorem t : 1 + 1 = 2 := by\n  norm_num\n"
    assert checker.check_unpinned(code, "t").status is Status.COMPLETE
