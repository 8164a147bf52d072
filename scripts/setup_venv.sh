#!/usr/bin/env bash
# Create .venv and install unimoe_ray with everything the demo and the tests need.
#
# CPU by default. GPU / Ascend users override the torch spec, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make test
# An unpinned `torch` would pull a multi-GB CUDA build, hence the pin.
#
# The install runs in two steps (docs/DESIGN.md §5): descript-audiotools pins protobuf<3.20, and a
# single resolve of the whole stack makes pip backtrack to an old ray. So the codec packages
# go in with --no-deps, their runtime needs named explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.unimoe_installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup_venv.sh ]; then
  exit 0
fi

if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v ffmpeg >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  # espeak-ng speaks the generated speech corpus; ffmpeg is audiotools' fallback decoder;
  # chromium runs the serving web page's test headless (Playwright drives it; no `playwright install`).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng ffmpeg chromium >/dev/null
  else
    echo "warning: espeak-ng/ffmpeg/chromium not found and cannot apt-get install them; the mini-corpus" \
      "and web-page tests will FAIL until you install them (sudo apt-get install -y espeak-ng ffmpeg chromium)" >&2
  fi
fi

[ -d "$VENV" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
# shellcheck disable=SC2086
$PIP install -q $TORCH_SPEC
# Step 1 also brings the codec's runtime needs (the `codec` extra in pyproject.toml).
DS_BUILD_OPS=0 $PIP install -q -e ".[dev,deepspeed,codec]"

# Step 2: the codec, without its protobuf<3.20 pin.
$PIP install -q --no-deps descript-audio-codec==1.0.0 descript-audiotools==0.7.2 torchaudio

# CPU-only workaround: PyPI's torchaudio wheel is a CUDA build whose compiled library does not
# load beside CPU torch. audiotools only imports torchaudio's pure-Python parts (we resample
# with julius), so move the compiled libraries aside. GPU installs keep them.
if [ "${TORCH_SPEC}" = "torch==2.13.0" ]; then
  "$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchaudio")
lib = pathlib.Path(spec.origin).parent / "lib"
for so in lib.glob("*.so"):
    so.rename(so.with_suffix(".so.disabled"))
PY
fi
# DeepSpeed on CPU JIT-compiles its shared-memory communication op (g++, ~40 s) the first time a
# process group starts; build it now, with the environment, not inside the first training run
# (a ZeRO run's two workers would each wait for it). It lands in torch's extension cache
# (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR), where DeepSpeed looks for it.
if [ "${TORCH_SPEC}" = "torch==2.13.0" ]; then
  "$VENV/bin/python" - <<'PY' || echo "warning: DeepSpeed's CPU communication op did not build (is g++ installed?); ZeRO runs will try again" >&2
from deepspeed.accelerator import get_accelerator

get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
PY
fi
touch "$STAMP"
echo "environment ready: $VENV"
