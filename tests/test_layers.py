"""The layers' boundaries: use cases and repositories know nothing of HTTP. A route maps their
errors (the hierarchy of shared/errors.py) to responses; none of them imports the framework."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("fastapi", "starlette")
LAYERS = sorted(
    {
        *ROOT.glob("services/*/repository*.py"),
        *ROOT.glob("services/*/repository/**/*.py"),
        *ROOT.glob("services/*/service*.py"),
        *ROOT.glob("services/*/service/**/*.py"),
        *ROOT.glob("services/*/domain.py"),
        ROOT / "services/scheduler/lifecycle.py",
        # The hierarchy every layer raises from; its HTTP rendering is shared/problems.py.
        ROOT / "shared/errors.py",
    }
)


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_every_service_has_a_service_layer() -> None:
    layered = {path.relative_to(ROOT).parts[1] for path in LAYERS if "service" in path.name}
    assert {"registry", "scheduler"} <= layered


@pytest.mark.parametrize("path", LAYERS, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_framework_in_use_cases_or_repositories(path: Path) -> None:
    framework = sorted(name for name in imported_modules(path) if name.split(".")[0] in FRAMEWORKS)
    assert framework == [], f"{path.relative_to(ROOT)} imports {framework}"


def test_the_check_finds_a_framework_import(tmp_path: Path) -> None:
    module = tmp_path / "service.py"
    module.write_text("import json\nfrom starlette.exceptions import HTTPException\n")
    assert "starlette.exceptions" in imported_modules(module)


def test_broker_errors_are_not_request_errors() -> None:
    from services.sender.clients import DependencyUnavailable
    from shared.errors import AblError, AppError, MessageError, PermanentMessageError

    for error in (MessageError, PermanentMessageError, DependencyUnavailable):
        assert issubclass(error, AblError)
        assert not issubclass(error, AppError), f"{error.__name__} would render as a response"


SERVICES = ("registry", "scheduler", "webhooks")


def string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def service_modules() -> list[Path]:
    return sorted(
        path
        for path in ROOT.glob("services/*/**/*.py")
        if "migrations" not in path.parts and path.parts[len(ROOT.parts) + 1] != "legacy_migrations"
    )


def test_no_service_reads_another_services_tables_or_imports_it() -> None:
    """The scheduler and the webhooks service keep copies of what they need of the registry's
    tenants and servers; no module of theirs (nor of the registry, nor shared/) names a table
    of another service, or imports another service's package. Only the composition roots
    (services/app.py, cli.py, ...) know several services."""
    from shared.migrate import owned_metadata

    owner = {
        table: service
        for service in SERVICES
        for table in owned_metadata(f"services.{service}").tables
    }
    assert {"tenants", "smtp_servers", "scheduler_servers", "webhooks_tenants"} <= owner.keys()
    # shared/spec.py's tag names are the resources' names, some of them a table's too.
    shared = sorted(p for p in (ROOT / "shared").glob("*.py") if p.name != "spec.py")
    for path in [*service_modules(), *shared]:
        parts = path.relative_to(ROOT).parts
        mine = parts[1] if parts[0] == "services" else None
        foreign_tables = sorted(
            name for name in string_literals(path) & owner.keys() if owner[name] != mine
        )
        assert foreign_tables == [], f"{'/'.join(parts)} names {foreign_tables}"
        if mine is not None:
            foreign = sorted(
                name
                for name in imported_modules(path)
                if name.startswith("services.") and name.split(".")[1] != mine
            )
            assert foreign == [], f"{'/'.join(parts)} imports {foreign}"
