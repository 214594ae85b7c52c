"""The installed package is the runtime only: importing it, its CLI, the Engine, the backends and the zoo (and
generating with them) pulls in no plotting, no scikit-learn and none of the research code in bench/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RESEARCH_ONLY = ("matplotlib", "sklearn", "bench")

PROGRAM = r"""
import json, sys
import msdda, msdda.cli, msdda.engine, msdda.backends, msdda.zoo, msdda.zoo.rewards
import msdda.backends.torch_backend, msdda.backends.onnxruntime_backend
from msdda import Engine
from msdda.zoo import OBJECTIVES, zoo_paths

paths = zoo_paths()
eng = Engine.from_pretrained(paths["base"], {name: paths[name] for name in OBJECTIVES[:2]})
eng.generate(class_labels=3, steps=2, num_images=1, output_type="latent")
print(json.dumps(sorted(sys.modules)))
"""


def test_runtime_imports_no_research_code(tmp_path):
    # bench/ importable (the repository root on the path), so that a runtime module reaching for it, even behind a
    # try/except, shows up in sys.modules instead of failing quietly
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=tmp_path, env=env, capture_output=True, text=True,
                          check=True)
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert "msdda.engine" in modules and "msdda.zoo.rewards" in modules      # the program really imported them
    leaked = sorted(m for m in modules if m.split(".")[0] in RESEARCH_ONLY)
    assert leaked == [], f"the runtime imported research-only modules: {leaked[:10]}"
