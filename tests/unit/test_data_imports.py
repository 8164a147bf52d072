"""The pure pieces of unimoe_ray.data import without Ray (the serving path reuses video.py)."""

from __future__ import annotations

import subprocess
import sys


def test_pure_modules_do_not_import_ray():
    code = (
        "import sys\n"
        "import unimoe_ray.data.video, unimoe_ray.data.quality, unimoe_ray.data.music\n"
        "assert 'torch' not in sys.modules, 'video/quality/music must stay numpy-only at import'\n"
        "import unimoe_ray.data.mini_corpus, unimoe_ray.data.decode, unimoe_ray.data.stages\n"
        "import unimoe_ray.data.encode, unimoe_ray.data.balance, unimoe_ray.data.shards\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
