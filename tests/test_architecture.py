"""The rooms and their arrows, as the README's architecture section states them."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "psomerge"
# top to bottom: a room imports only rooms below it
STACK = ["cli", "presets", "orchestration", "tracking", "pipeline", "config", "swarm", "merging", "evaluation",
         "judges", "generation", "io"]
HELPERS = {"errors", "paths", "hashing", "templates", "kvstore", "progress", "credentials", "yamlconfig", "__init__"}
# the vLLM worker is the entry point of the engine's own process: it opens the basis there
WORKER = PACKAGE / "generation" / "vllm_worker.py"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_each_room_imports_only_rooms_below_it():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        room = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] != "psomerge" or len(parts) < 2 or parts[1] in (room, *HELPERS):
                continue
            target = parts[1]
            if room in HELPERS:
                wrong.append(f"{path}: helper imports {module}")
            elif path == WORKER and target == "swarm":
                continue
            elif room != "cli" and target != "presets" and STACK.index(target) <= STACK.index(room):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
            elif room == "presets" and target not in ("config",):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_mlflow_only_in_tracking_and_prefect_only_in_orchestration_and_cli():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        room = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for module in _imports(path):
            top = module.split(".")[0]
            if top == "mlflow" and room != "tracking":
                wrong.append(f"{path}: {module}")
            if top.startswith("prefect") and room not in ("orchestration", "cli"):
                wrong.append(f"{path}: {module}")
    assert not wrong, "\n".join(wrong)


def test_importing_the_package_changes_no_environment_and_creates_no_folder(tmp_path):
    """Every module of the package imported in a fresh interpreter, in an empty working
    directory with an empty home: no environment variable psomerge sets, no folder created
    (what third-party imports do on their own, like transformers' inductor cache variable, is
    not psomerge's and is left out by comparing against importing those packages alone)."""
    modules = sorted({".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
                      for p in PACKAGE.rglob("*.py") if p.name != "__main__.py" and p != WORKER})
    modules = [m.removesuffix(".__init__") for m in modules]
    probe = ("import json, os, sys, importlib; third = sys.argv[1] == 'third'; before = dict(os.environ)\n"
             "names = ['torch', 'transformers', 'numpy', 'safetensors', 'pydantic', 'yaml', 'prefect', 'mlflow', "
             "'openai', 'numba', 'lm_eval', 'datasets', 'peft'] if third else json.loads(sys.argv[2])\n"
             "for n in names:\n    importlib.import_module(n)\n"
             "print(json.dumps(sorted(k for k in os.environ if os.environ.get(k) != before.get(k))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PSOMERGE_", "PREFECT_", "MLFLOW_"))}

    def changed(which: str) -> tuple[set[str], set[str], list[Path]]:
        home, cwd = tmp_path / which / "home", tmp_path / which / "cwd"
        home.mkdir(parents=True), cwd.mkdir()
        run_env = {**env, "HOME": str(home), "PYTHONPATH": str(PACKAGE.parent),
                   "PREFECT_HOME": str(tmp_path / which / "prefect-home")}
        out = subprocess.run([sys.executable, "-c", probe, which, json.dumps(modules)], cwd=cwd, env=run_env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return (set(json.loads(out.stdout.strip().splitlines()[-1])), {p.name for p in home.iterdir()},
                list(cwd.iterdir()))

    third_env, third_home, _ = changed("third")
    ours_env, ours_home, ours_cwd = changed("ours")
    assert ours_env <= third_env, f"psomerge's imports set {sorted(ours_env - third_env)}"
    assert ours_cwd == [], f"importing psomerge created {ours_cwd} in the working directory"
    assert ours_home <= third_home, f"importing psomerge created {sorted(ours_home - third_home)} in $HOME"
