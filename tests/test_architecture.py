"""The package layout is a contract: stages import only earlier stages, and plug-ins have one import."""

from __future__ import annotations

import ast
from pathlib import Path

import apm_bench

PACKAGE = Path(apm_bench.__file__).resolve().parent

# import order, earliest first; docs/architecture.md explains it
STAGES = ["foundation", "world", "engines", "judging", "methods", "run", "reporting", "faces"]
STAGE_OF_TOP = {"world": "world", "backends": "engines", "sim": "engines", "judging": "judging",
                "methods": "methods", "run": "run", "reporting": "reporting", "cli": "faces", "serve": "faces",
                "errors": "foundation", "registry": "foundation", "cache": "foundation", "inputs": "foundation", "data": "foundation",
                "machine": "foundation", "tiny": "run"}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "apm_bench" or len(parts) < 2:
        return None
    return STAGE_OF_TOP[parts[1]]


def _imports(path: Path) -> set[str]:
    """Every apm_bench module a file imports, function-local and TYPE_CHECKING imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names if node.module == "apm_bench")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("apm_bench.")}


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(relative.parts).removesuffix(".__init__")


def test_every_module_belongs_to_a_stage() -> None:
    tops = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.rglob("*.py")}
    assert tops - {"__init__"} <= set(STAGE_OF_TOP), f"modules outside every stage: {tops - set(STAGE_OF_TOP)}"


def test_no_module_imports_a_later_stage() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        own = _stage(module)
        if own is None:
            continue
        for imported in _imports(path):
            theirs = _stage(imported)
            if theirs is not None and STAGES.index(theirs) > STAGES.index(own):
                violations.append(f"{module} ({own}) imports {imported} ({theirs})")
    assert not violations, "\n".join(violations)


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an engine module that imports a method is reported."""
    offending = tmp_path / "offending.py"
    offending.write_text("from apm_bench.methods.base import Personalizer\n")
    imported = _imports(offending)
    assert imported == {"apm_bench.methods.base"}
    assert STAGES.index(_stage("apm_bench.methods.base")) > STAGES.index(_stage("apm_bench.backends.sim"))


def test_plugin_module_carries_what_a_method_needs() -> None:
    from apm_bench import methods
    from apm_bench.backends import base
    from apm_bench.methods import plugin
    from apm_bench.world import prompting

    for name in ("Personalizer", "register_method", "FitContext", "Personalization", "UserView"):
        assert getattr(plugin, name) is getattr(methods, name)
    assert plugin.chat is base.chat and plugin.Message is base.Message and plugin.AdapterRef is base.AdapterRef
    assert plugin.style_instruction is prompting.style_instruction
    assert set(plugin.__all__) == {name for name in dir(plugin) if not name.startswith("_")} - {"annotations"}


def test_a_method_written_against_the_plugin_module_runs() -> None:
    from apm_bench.methods.plugin import METHODS, Personalization, Personalizer, UserView, chat, register_method

    @register_method("test-plugin-echo")
    class Echo(Personalizer):
        description = "test"

        def personalize(self, user: UserView, prompt: str) -> Personalization:
            return Personalization(chat(prompt, system=f"{len(user.history)} messages"))

    try:
        made = METHODS.get("test-plugin-echo")().personalize(UserView("u1", ("a", "b")), "hi")
        assert [m.content for m in made.messages] == ["2 messages", "hi"]
    finally:
        METHODS._items.pop("test-plugin-echo", None)
