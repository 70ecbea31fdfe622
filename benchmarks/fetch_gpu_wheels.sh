#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_check.sh installs on a lent GPU machine: the
# packages its image lacks (torchrl, tensordict and their small dependencies; the image has zipp,
# cloudpickle, numpy, packaging, h5py and typer), and those the offline script's GPU test needs
# (gymnasium with MuJoCo, minari, hydra), built for its Python 3.12 on x86-64 Linux (~30 MB). The folder
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
  "${plat[@]}" -d .whl torchrl==0.14.1 tensordict==0.14.3 hoptorch pyvers orjson importlib_metadata lazy-importer \
  gymnasium==1.4.0 farama-notifications==0.0.6 mujoco==4.0.0 mujoco-core==4.0.0 mujoco-studio==4.0.0 \
  glfw==2.11.0 pyopengl==3.1.10 minari==0.5.4 hydra-core==1.3.8 omegaconf==2.3.1
# hydra's parser runtime is published as a source archive only; its wheel is pure Python
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
du -sh .whl
