"""Choosing a Lean backend from configuration; no configuration is an error that says how to set up Lean."""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .checker import Backend
from .kimina import KiminaBackend, KiminaConfig
from .leandojo_backend import LeanDojoBackend, LeanDojoConfig, LeanDojoUnavailable
from .pool import PoolConfig, ReplPool
from .repl_process import ProcessConfig

SETUP_HELP = """\
No Lean backend is configured, and this package never reports a proof as verified without one.
Choose one:

  1. Local REPL pool (any command that speaks the Lean REPL JSON protocol):
       curl https://raw.githubusercontent.com/leanprover/elan/master/elan-init.sh -sSf | sh
       git clone https://github.com/xinhjBrant/mathlib4 && cd mathlib4 && git checkout 2f65ba7f
       # Lean v4.9.0-rc1 (lean-toolchain) with the REPL fork xinhjBrant/repl @ 3334a97b as a Lake dependency,
       # the statements in prover/data assume exactly this pin
       lake exe cache get && lake build
     then pass  --backend repl --repl-cmd "lake exe repl" --repl-cwd /path/to/mathlib4

  2. A Kimina Lean Server (project-numina/kimina-lean-server) running elsewhere:
       --backend kimina --kimina-url http://HOST:8000

  3. LeanDojo (pip install 'deepseek-suite[leandojo]', traced repository): --backend leandojo

See docs/prover.md for details."""


class BackendNotConfigured(RuntimeError):
    def __init__(self, detail: str = ""):
        super().__init__((detail + "\n\n" if detail else "") + SETUP_HELP)


@dataclass(frozen=True)
class BackendConfig:
    kind: str | None = None  # "repl" | "kimina" | "leandojo"
    repl_cmd: str | None = None  # shell-style command line, e.g. "lake exe repl"
    repl_cwd: str | None = None
    workers: int = 2
    memory_limit_gb: float | None = 10.0
    max_uses: int | None = None
    header_timeout: float = 600.0
    kimina_url: str | None = None
    kimina_api_key: str | None = None
    leandojo_repo: str = LeanDojoConfig.repo_url
    leandojo_commit: str = LeanDojoConfig.commit
    leandojo_file: str = LeanDojoConfig.file_template

    @classmethod
    def from_file(cls, path: str | Path) -> "BackendConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read backend config {path}: {e}") from e
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown backend config keys {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("kimina_api_key")  # never written into run manifests
        return d


def make_backend(cfg: BackendConfig) -> Backend:
    if cfg.kind is None:
        raise BackendNotConfigured()
    if cfg.kind == "repl":
        if not cfg.repl_cmd:
            raise BackendNotConfigured("--backend repl needs --repl-cmd")
        limit = int(cfg.memory_limit_gb * 1024**3) if cfg.memory_limit_gb else None
        process = ProcessConfig(tuple(shlex.split(cfg.repl_cmd)), cfg.repl_cwd, limit)
        return ReplPool(PoolConfig(process, cfg.workers, cfg.max_uses, cfg.header_timeout))
    if cfg.kind == "kimina":
        if not cfg.kimina_url:
            raise BackendNotConfigured("--backend kimina needs --kimina-url")
        return KiminaBackend(KiminaConfig(cfg.kimina_url, cfg.kimina_api_key))
    if cfg.kind == "leandojo":
        try:
            return LeanDojoBackend(LeanDojoConfig(cfg.leandojo_repo, cfg.leandojo_commit, cfg.leandojo_file))
        except LeanDojoUnavailable as e:  # not installed: the same setup message as no backend at all
            raise BackendNotConfigured(f"--backend leandojo: {e}") from e
    raise ValueError(f"unknown backend kind {cfg.kind!r}; choose repl, kimina or leandojo")
