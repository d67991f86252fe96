"""The architecture holds: four parts whose imports point one way (trainer -> rollout -> loss
-> kernels; integrations -> loss), and importing the loss library pulls in no trainer, rollout or model code."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# part -> (its folder, the mr1fast parts it may import besides itself)
PARTS = {
    "kernels": (ROOT / "kernels", set()),
    "loss": (ROOT / "mr1fast" / "loss", {"kernels"}),
    "rollout": (ROOT / "mr1fast" / "rollout", {"loss", "kernels"}),
    "trainer": (ROOT / "mr1fast" / "trainer", {"rollout", "loss", "kernels"}),
    # Other trainers' adapters (TRL): the loss library only.
    "integrations": (ROOT / "mr1fast" / "integrations", {"loss", "kernels"}),
}


def part_of(module: str):
    """mr1fast.<part>... -> part; the package root 'mr1fast' -> 'root'; else None."""
    names = module.split(".")
    if names[0] != "mr1fast":
        return None
    return names[1] if len(names) > 1 and names[1] in PARTS else "root"


def imported_modules(path: Path, package: str):
    """Absolute names of every module `path` imports (function-level imports too)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            if node.module:
                yield mod, node.lineno
            for alias in node.names:  # `from . import x` may name a module
                yield f"{mod}.{alias.name}", node.lineno


def test_every_module_belongs_to_a_part():
    stray = [p.name for p in (ROOT / "mr1fast").glob("*.py")
             if p.name not in ("__init__.py", "__main__.py")]
    assert stray == [], f"modules outside the four parts: {stray}"


@pytest.mark.parametrize("part", list(PARTS))
def test_imports_point_one_way(part):
    folder, allowed = PARTS[part]
    package = "mr1fast." + part
    bad = []
    for path in sorted(folder.glob("*.py")):
        for mod, line in imported_modules(path, package):
            target = part_of(mod)
            if target in (None, part):
                continue
            if target == "root" or target not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert bad == [], "imports against the architecture:\n" + "\n".join(bad)


def test_the_package_root_imports_only_the_loss_library():
    tree = ast.parse((ROOT / "mr1fast" / "__init__.py").read_text())
    targets = {part_of("mr1fast" + ("." + n.module if n.module else ""))
               for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert targets == {"loss"}


@pytest.mark.parametrize("statement", ["import mr1fast", "import mr1fast.loss",
                                       "from mr1fast import grpo_loss, token_logprobs"])
def test_importing_the_loss_library_imports_no_model_code(statement):
    code = (f"{statement}\nimport sys\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'vllm', 'torchvision', 'triton', 'mr1fast'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    forbidden = [m for m in out if m.split(".")[0] in ("transformers", "vllm", "torchvision",
                                                       "triton")
                 or m.startswith(("mr1fast.rollout", "mr1fast.trainer"))]
    assert forbidden == [], f"{statement} imported {forbidden}"  # the shim lives in rollout
    assert "mr1fast.loss.api" in out  # the check saw the import at all

