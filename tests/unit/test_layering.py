"""STYLE.md §1: the math knows nothing of Ray."""

import subprocess
import sys


def test_model_audio_inference_do_not_import_ray():
    code = (
        "import sys, pkgutil, importlib, unimoe_ray\n"
        "for pkg in ('unimoe_ray.model', 'unimoe_ray.audio', 'unimoe_ray.inference'):\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "import unimoe_ray.config, unimoe_ray.checkpoint\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
