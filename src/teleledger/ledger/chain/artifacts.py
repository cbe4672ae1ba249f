"""Compile the Vyper contracts into committed, reproducible JSON artifacts — or check for drift.

    python -m teleledger.ledger.chain.artifacts          # rewrite artifacts/<Name>.json
    python -m teleledger.ledger.chain.artifacts --check  # exit 1 and say what drifted

Each artifact holds exactly::

    {"contract_name", "compiler": "vyper-<version>", "settings": {"evm_version", "optimize"},
     "source_sha256": sha256 of the .vy file bytes, "abi", "bytecode", "bytecode_runtime"}

serialized as ``json.dumps(..., indent=2, sort_keys=True) + "\\n"``. The output depends only on
the source bytes, the compiler version and ``SETTINGS`` (also pinned as pragmas in each source,
so titanoboa compiles the same code the node deploys). A different installed compiler version
is reported as drift rather than silently producing other bytecode.

Only this module imports ``vyper``, lazily; the node's deploy path reads the JSON.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from teleledger.core.errors import ConfigurationError
from teleledger.ledger.chain import ARTIFACTS_DIR, CONTRACT_NAMES, source_path

COMPILER_VERSION = "0.4.3"
SETTINGS: dict[str, str] = {"evm_version": "cancun", "optimize": "gas"}


class ArtifactDrift(ConfigurationError):
    """The committed artifacts do not match what the sources compile to."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "contract artifacts drifted from their sources "
            "(run python -m teleledger.ledger.chain.artifacts):\n  " + "\n  ".join(problems)
        )


def compile_contract(name: str) -> dict[str, Any]:
    """Compile one contract with the pinned settings; the artifact as a dict."""
    import vyper
    from vyper.compiler import compile_code
    from vyper.compiler.settings import OptimizationLevel, Settings

    if vyper.__version__ != COMPILER_VERSION:
        raise ArtifactDrift([f"compiler: expected vyper {COMPILER_VERSION}, found {vyper.__version__}"])
    path = source_path(name)
    source = path.read_bytes()
    out = compile_code(
        source.decode("utf-8"),
        contract_path=path.name,
        output_formats=["abi", "bytecode", "bytecode_runtime"],
        settings=Settings(
            evm_version=SETTINGS["evm_version"],
            optimize=OptimizationLevel.from_string(SETTINGS["optimize"]),
        ),
    )
    return {
        "contract_name": name,
        "compiler": f"vyper-{vyper.__version__}",
        "settings": dict(SETTINGS),
        "source_sha256": hashlib.sha256(source).hexdigest(),
        "abi": out["abi"],
        "bytecode": out["bytecode"],
        "bytecode_runtime": out["bytecode_runtime"],
    }


def render(artifact: dict[str, Any]) -> str:
    return json.dumps(artifact, indent=2, sort_keys=True) + "\n"


def build_artifacts(*, check: bool = False, out_dir: Path | None = None) -> list[Path]:
    """Compile every contract; write its artifact, or with ``check`` raise ``ArtifactDrift``.

    Returns the artifact paths (written, or verified when ``check``).
    """
    out_dir = out_dir or ARTIFACTS_DIR
    paths: list[Path] = []
    problems: list[str] = []
    for name in CONTRACT_NAMES:
        fresh = compile_contract(name)
        path = out_dir / f"{name}.json"
        paths.append(path)
        if not check:
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(render(fresh), encoding="utf-8")
            continue
        if not path.exists():
            problems.append(f"{name}: missing {path}")
            continue
        committed = json.loads(path.read_text(encoding="utf-8"))
        for field in sorted(set(fresh) | set(committed)):
            if fresh.get(field) != committed.get(field):
                found = committed.get(field)
                detail = f"expected {fresh.get(field)!r}, found {found!r}" if field in ("compiler", "source_sha256", "settings") else "differs"
                problems.append(f"{name}.{field}: {detail}")
        if not problems and path.read_text(encoding="utf-8") != render(fresh):
            problems.append(f"{name}: formatting differs from the canonical rendering")
    if problems:
        raise ArtifactDrift(problems)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    unknown = [a for a in args if a != "--check"]
    if unknown:
        print(f"usage: python -m teleledger.ledger.chain.artifacts [--check] (unknown: {' '.join(unknown)})", file=sys.stderr)
        return 2
    check = "--check" in args
    try:
        paths = build_artifacts(check=check)
    except ArtifactDrift as exc:
        print(str(exc), file=sys.stderr)
        return 1
    verb = "up to date" if check else "written"
    for path in paths:
        print(f"{path.name}: {verb}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
