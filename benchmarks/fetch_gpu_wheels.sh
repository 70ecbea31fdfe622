#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_check.sh installs on a lent GPU machine: the
# packages its image lacks (torchrl, tensordict and their small dependencies; the image has zipp,
# cloudpickle, numpy and packaging), built for its Python 3.12 on x86-64 Linux. The folder
# .whl/ is kept out of git (.git/info/exclude); name it in the device tool's `carry` ([".whl"]).
# Versions: the ones this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl torchrl==0.14.1 tensordict==0.14.3 hoptorch pyvers orjson importlib_metadata lazy-importer
ls -l .whl
du -sh .whl
