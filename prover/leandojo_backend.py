"""LeanDojo adapter (optional extra `leandojo`): tactic-by-tactic checking of a traced repository's theorem.

LeanDojo only runs theorems that exist in a traced repository file (e.g. yangky11/miniF2F-lean4), so
the statement checked is that repository's, not the one in the submitted file; helper lemmas are not
available. It has no `#print axioms`, so its verdicts carry no audit and the checker fails them closed
unless the audit requirement is switched off explicitly.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from types import ModuleType

from .leantext import top_level_steps
from .pinning import decl_pattern, proof_start
from .textguard import blank_comments_and_strings
from .verdict import Status, Verdict


class LeanDojoUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class LeanDojoConfig:
    repo_url: str = "https://github.com/yangky11/miniF2F-lean4"
    commit: str = "main"
    file_template: str = "MiniF2F/Test/{name}.lean"  # where the theorem lives in the traced repo


def proof_tactics(code: str, theorem: str) -> list[str]:
    """Top-level tactics of `theorem`'s `:= by` block in `code`."""
    blanked = blank_comments_and_strings(code)
    decl = decl_pattern(theorem).search(blanked)
    if decl is None:
        raise ValueError(f"`theorem {theorem}` not found")
    body = code[proof_start(blanked, decl.start()):]
    return [s.text for s in top_level_steps(body.strip("\n"))]


class LeanDojoBackend:
    def __init__(self, config: LeanDojoConfig, module: ModuleType | None = None):
        try:
            self.dojo = module or importlib.import_module("lean_dojo")
        except ImportError as e:
            raise LeanDojoUnavailable(
                "the LeanDojo backend needs `pip install 'deepseek-suite[leandojo]'`, git, elan and a traced "
                "repository (see docs/prover.md)") from e
        self.config = config
        self.repo = self.dojo.LeanGitRepo(config.repo_url, config.commit)

    def verify(self, code: str, timeout: float, theorem: str | None = None) -> Verdict:
        start = time.monotonic()
        if theorem is None:
            return Verdict(Status.SYSTEM_ERROR, "LeanDojo checks a named theorem; none given")
        try:
            tactics = proof_tactics(code, theorem)
        except ValueError as e:
            return Verdict(Status.LEAN_ERROR, str(e))
        d = self.dojo
        thm = d.Theorem(self.repo, self.config.file_template.format(name=theorem), theorem)
        try:
            with d.Dojo(thm, timeout=int(timeout)) as (dojo, state):
                verdict = self._run(dojo, state, tactics)
        except d.DojoTacticTimeoutError as e:
            verdict = Verdict(Status.TIMEOUT, f"LeanDojo: {e}")
        except (d.DojoCrashError, d.DojoInitError) as e:
            verdict = Verdict(Status.SYSTEM_ERROR, f"LeanDojo: {type(e).__name__}: {e}")
        return verdict.with_time(time.monotonic() - start)

    def _run(self, dojo, state, tactics: list[str]) -> Verdict:
        d = self.dojo
        for i, tactic in enumerate(tactics):
            state = dojo.run_tac(state, tactic)
            if isinstance(state, d.LeanError):
                return Verdict(Status.LEAN_ERROR, f"tactic {i + 1}: {state.error}")
            if isinstance(state, d.ProofGivenUp):
                return Verdict(Status.SORRY, f"tactic {i + 1} gives up (sorry)")
            if isinstance(state, d.ProofFinished):
                if i + 1 < len(tactics):
                    return Verdict(Status.LEAN_ERROR, f"no goals left for tactic {i + 2}")
                return Verdict(Status.COMPLETE)
        return Verdict(Status.LEAN_ERROR, f"unsolved goals: {getattr(state, 'pp', '')[:200]}")

    def close(self) -> None:
        """Each verify opens and closes its own Dojo."""
