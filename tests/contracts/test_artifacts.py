"""The committed contract artifacts are exactly what the sources compile to (no drift)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vyper", reason="vyper compiler is not installed: artifact drift check skipped")

from teleledger.ledger.chain import ARTIFACTS_DIR, CONTRACT_NAMES, load_artifact, source_path  # noqa: E402
from teleledger.ledger.chain.artifacts import (  # noqa: E402
    ArtifactDrift,
    build_artifacts,
    compile_contract,
    main,
    render,
)


def test_committed_artifacts_match_a_fresh_compile():
    assert build_artifacts(check=True) == [ARTIFACTS_DIR / f"{n}.json" for n in CONTRACT_NAMES]


def test_compiling_twice_gives_identical_bytes():
    name = CONTRACT_NAMES[0]
    assert render(compile_contract(name)) == render(compile_contract(name))


def test_each_artifact_records_compiler_settings_and_source_hash():
    import hashlib

    for name in CONTRACT_NAMES:
        artifact = load_artifact(name)
        assert artifact["compiler"] == "vyper-0.4.3"
        assert artifact["settings"] == {"evm_version": "cancun", "optimize": "gas"}
        assert artifact["source_sha256"] == hashlib.sha256(source_path(name).read_bytes()).hexdigest()
        assert artifact["bytecode"].startswith("0x") and artifact["bytecode_runtime"].startswith("0x")
        assert {e["name"] for e in artifact["abi"] if e["type"] == "event"}


def test_a_tampered_artifact_is_reported_as_drift(tmp_path, capsys, monkeypatch):
    build_artifacts(out_dir=tmp_path)
    path = tmp_path / "ConsentRegistry.json"
    artifact = json.loads(path.read_text())
    artifact["bytecode"] = artifact["bytecode"][:-2] + "00"
    path.write_text(render(artifact))
    (tmp_path / "AnchorRegistry.json").unlink()
    with pytest.raises(ArtifactDrift) as excinfo:
        build_artifacts(check=True, out_dir=tmp_path)
    assert excinfo.value.problems == ["ConsentRegistry.bytecode: differs", f"AnchorRegistry: missing {tmp_path / 'AnchorRegistry.json'}"]

    import teleledger.ledger.chain.artifacts as module

    monkeypatch.setattr(module, "ARTIFACTS_DIR", tmp_path)
    assert main(["--check"]) == 1
    assert "ConsentRegistry.bytecode: differs" in capsys.readouterr().err
