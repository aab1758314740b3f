"""Which part of epost may import which (issue 16 item 6, docs/architecture.md).

The graph is read from the source with `ast`, so an import inside a function
counts as much as one at the top of a file: a circle hidden in a function is
still a circle, it only shows up later (a web page importing the `epost`
command, which imports the daemon's wiring, which imports the web UI).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EPOST = ROOT / "epost"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> Iterator[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every epost import in `path`, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "epost":
                    yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            if module.split(".")[0] != "epost":
                continue
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                if is_module(submodule):  # `from epost import metrics`: the module metrics
                    yield submodule, "", node.lineno
                else:
                    yield module, alias.name, node.lineno


def python_files(*folders: Path) -> list[Path]:
    return sorted(path for folder in folders for path in folder.rglob("*.py") if ".venv" not in path.parts)


def unit(module: str) -> str:
    """The top-level part a module belongs to: `epost.web.site` -> `web`, `epost.service` -> `service`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "epost"


def unit_graph(files: Iterable[Path]) -> dict[str, dict[str, list[str]]]:
    """{from unit: {to unit: ["epost/x.py:12 imports epost.y", ...]}} between different top-level parts."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in files:
        source = unit(module_name(path))
        graph.setdefault(source, {})
        for target, _, line in imports(path):
            why = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if unit(target) != source and why not in graph[source].get(unit(target), []):
                graph[source].setdefault(unit(target), []).append(why)
    return graph


def circles(graph: dict[str, dict[str, list[str]]]) -> list[set[str]]:
    """The strongly connected parts of `graph` with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, {}):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            members = set()
            while True:
                member = stack.pop()
                members.add(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(members)

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def violations(files: Iterable[Path], forbidden) -> list[str]:
    """`path:line imports X` for every import for which `forbidden(importer, module, name)` is true."""
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}{f'.{name}' if name else ''}"
        for path in files
        for module, name, line in imports(path)
        if forbidden(module_name(path), module, name)
    ]


EPOST_FILES = python_files(EPOST)
# Everything that could import epost: the package, its tests, benchmarks and the twistd plugin.
ALL_FILES = python_files(EPOST, ROOT / "tests", ROOT / "bench", ROOT / "twisted" / "plugins")
# The daemon's wiring, the `epost` command, the control channel and the web UI: above the mail path.
TOP = {"admin", "service", "web", "control", "routing_chain", "tap"}


def inside(module: str, *packages: str) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def test_the_graph_sees_every_kind_of_import():
    """The reader itself: module, from-module, from-package-import-module and function-level imports."""
    found = {(module, name) for module, name, _ in imports(EPOST / "service.py")}
    assert ("epost.metrics", "") in found  # from epost import metrics
    assert ("epost.config", "Config") in found
    tap = {(module, name) for module, name, _ in imports(EPOST / "tap.py")}
    assert ("epost.service", "make_service") in tap  # inside make_service_from_options


def test_address_and_reply_have_no_home_in_smtp_any_more():
    assert not (EPOST / "smtp" / "address.py").exists()
    bad = violations(
        ALL_FILES,
        lambda _, module, name: module == "epost.smtp.address" or (module == "epost.smtp.interfaces" and name == "Reply"),
    )
    assert bad == [], "import Address from epost.address and Reply from epost.reply:\n" + "\n".join(bad)


def test_address_and_reply_import_nothing_of_epost():
    """Leaf value types: anything may import them without pulling in a part of the daemon."""
    assert list(imports(EPOST / "address.py")) == []
    assert list(imports(EPOST / "reply.py")) == []


@pytest.mark.parametrize("package", ["epost.routing", "epost.queue", "epost.delivery"])
def test_the_mail_path_never_reaches_back_into_the_smtp_listener(package):
    bad = violations(EPOST_FILES, lambda importer, module, _: inside(importer, package) and inside(module, "epost.smtp"))
    assert bad == [], "\n".join(bad)


def test_routing_imports_only_values_config_and_metrics():
    """Pure decisions: routing/ knows the config and the value types, not the queue, delivery, SMTP or admin."""
    allowed = ("epost.routing", "epost.address", "epost.reply", "epost.config", "epost.metrics")
    bad = violations(EPOST_FILES, lambda importer, module, _: inside(importer, "epost.routing") and not inside(module, *allowed))
    assert bad == [], "\n".join(bad)


def test_the_store_imports_only_the_file_helpers_and_addresses():
    """Storage below scheduling: epost/store/ knows files and addresses, not the queue manager, delivery, SMTP, web or admin."""
    allowed = ("epost.store", "epost.fsutil", "epost.address")
    bad = violations(EPOST_FILES, lambda importer, module, _: inside(importer, "epost.store") and not inside(module, *allowed))
    assert bad == [], "\n".join(bad)


def test_web_never_imports_the_epost_command():
    bad = violations(EPOST_FILES, lambda importer, module, _: inside(importer, "epost.web") and inside(module, "epost.admin.cli"))
    assert bad == [], "\n".join(bad)


def test_only_the_twistd_plugin_glue_imports_the_daemon_wiring():
    bad = violations(EPOST_FILES, lambda importer, module, _: inside(module, "epost.service") and importer != "epost.tap")
    assert bad == [], "\n".join(bad)


def test_no_import_circle_through_admin_service_web_or_control():
    graph = unit_graph(EPOST_FILES)
    for members in circles(graph):
        if members & TOP:
            edges = [why for source in sorted(members) for target, whys in graph[source].items() if target in members for why in whys]
            pytest.fail(f"import circle among {sorted(members)}:\n" + "\n".join(edges))


def test_circles_are_found():
    """The circle finder is not vacuous."""
    graph = {"admin": {"service": []}, "service": {"web": []}, "web": {"admin": []}, "routing": {"address": []}}
    assert circles(graph) == [{"admin", "service", "web"}]
    assert circles({"a": {"b": []}, "b": {}}) == []
