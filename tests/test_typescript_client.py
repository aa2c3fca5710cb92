"""The TypeScript client a frontend generates from the committed spec compiles: openapi-typescript
(pinned in clients/typescript/package-lock.json, installed by `make client-deps`) writes
`schema.d.ts` from openapi/api.json, and `tsc --noEmit` type-checks clients/typescript/usage.ts
(create a tenant, add a server, send a batch, read the warmup, switch on problem codes) with
openapi-fetch against it.

The types are generated here, not committed: the committed artifact is the spec (which
tests/test_openapi.py keeps equal to the app), and a second committed copy would only need a
third comparison. The negative checks show the test can fail: a code the operation cannot
answer, a spec change that breaks the usage, and a spec the generator rejects.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.openapi import SPEC_DIR
from tests.conftest import IN_CI

CLIENT = Path(__file__).resolve().parent.parent / "clients" / "typescript"
USAGE = (CLIENT / "usage.ts").read_text()
Spec = dict[str, Any]


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None or not (CLIENT / "node_modules" / ".installed").exists():
        message = "node and `make client-deps` are needed to generate the TypeScript client"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(node: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - node with our own scripts and fixed arguments
        [node, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=CLIENT,
        timeout=300,
    )


def committed_spec() -> Spec:
    spec: Spec = json.loads((SPEC_DIR / "api.json").read_text())
    return spec


def build(
    node: str, work: Path, spec: Spec, usage: str = USAGE
) -> subprocess.CompletedProcess[str]:
    """Generate `schema.d.ts` from `spec` into `work` and type-check `usage` against it, as a
    frontend's build does; the generator's failure is returned as it is."""
    work.mkdir(exist_ok=True)
    (work / "api.json").write_text(json.dumps(spec))
    generated = run(node, CLIENT / "generate.mjs", work / "api.json", work / "schema.d.ts")
    if generated.returncode != 0:
        return generated
    (work / "usage.ts").write_text(usage)
    shutil.copy(CLIENT / "tsconfig.json", work / "tsconfig.json")
    (work / "node_modules").symlink_to(CLIENT / "node_modules", target_is_directory=True)
    tsc = CLIENT / "node_modules" / "typescript" / "bin" / "tsc"
    return run(node, tsc, "--noEmit", "-p", work)


def test_the_generated_client_compiles_with_the_usage_file(node: str, tmp_path: Path) -> None:
    result = build(node, tmp_path, committed_spec())
    assert result.returncode == 0, result.stdout + result.stderr
    schema = (tmp_path / "schema.d.ts").read_text()
    # Methods read well: the operations are named by their operationIds.
    for operation in ("createTenant", "addServer", "acceptMessages", "getWarmup", "listServers"):
        assert f"    {operation}: {{" in schema
    # Each error response narrows `code` to what the operation can answer.
    assert '"application/problem+json": components["schemas"]["Problem"] & {' in schema


def test_a_code_the_operation_cannot_answer_does_not_compile(node: str, tmp_path: Path) -> None:
    # A typo, or a code of another operation (`email_not_found` is not addServer's).
    for wrong in ('case "server_exist":', 'case "email_not_found":'):
        usage = USAGE.replace('case "server_exists":', wrong, 1)
        assert usage != USAGE
        result = build(node, tmp_path / wrong[6:-2], committed_spec(), usage)
        assert result.returncode != 0
        assert "error TS2678" in result.stdout, result.stdout + result.stderr


def _rename_allowance(spec: Spec) -> None:
    warmup = spec["components"]["schemas"]["WarmupPublic"]
    warmup["properties"]["allowance"] = warmup["properties"].pop("allowance_today")
    warmup["required"] = [
        "allowance" if name == "allowance_today" else name for name in warmup["required"]
    ]


def _drop_server_exists(spec: Spec) -> None:
    conflict = spec["paths"]["/v1/servers"]["post"]["responses"]["409"]
    narrowed = conflict["content"]["application/problem+json"]["schema"]["allOf"][1]
    narrowed["properties"]["code"]["enum"] = ["conflict"]


def _require_sequence(spec: Spec) -> None:
    spec["components"]["schemas"]["EmailCreate"]["required"].append("sequence")


def _move_warmup(spec: Spec) -> None:
    paths = spec["paths"]
    paths["/v1/warmup/{server_id}"] = paths.pop("/v1/servers/{server_id}/warmup")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (_rename_allowance, "allowance_today"),
        (_drop_server_exists, '"server_exists"'),
        (_require_sequence, "sequence"),
        (_move_warmup, "/v1/servers/{server_id}/warmup"),
    ],
    ids=["renamed field", "code dropped", "new required field", "moved path"],
)
def test_a_spec_change_that_breaks_the_usage_fails(
    node: str, tmp_path: Path, change: Callable[[Spec], None], named: str
) -> None:
    spec = committed_spec()
    change(spec)
    result = build(node, tmp_path, spec)
    assert result.returncode != 0
    assert "usage.ts" in result.stdout, result.stdout + result.stderr
    assert named in result.stdout, result.stdout


def test_a_spec_the_generator_rejects_fails(node: str, tmp_path: Path) -> None:
    spec = committed_spec()
    warmup = spec["components"]["schemas"]["WarmupPublic"]
    warmup["properties"]["step"] = {"$ref": "#/components/schemas/Missing"}
    result = build(node, tmp_path, spec)
    assert result.returncode != 0
    assert "Can't resolve $ref" in result.stdout + result.stderr
    assert not (tmp_path / "schema.d.ts").exists()
