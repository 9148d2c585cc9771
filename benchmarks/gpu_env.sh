#!/usr/bin/env bash
# Model environment for tritonserver on a GPU machine that has torch but neither tritonserver nor
# numpy<2: a venv with numpy 1.26 that also sees the system torch, plus the nvidia-pytriton build.
# Usage: benchmarks/gpu_env.sh WHEEL_DIR TRITON_ARCHIVE STUB_ARCHIVE   (then: source /tmp/menv/bin/activate)
set -euo pipefail
wheels=$1 triton=$2 stubs=$3
python3 -m venv /tmp/menv
site=$(/tmp/menv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
system_site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
/tmp/menv/bin/python -m pip install -q --no-index --no-deps --no-compile "$wheels"/*.whl
# The system packages, minus numpy and what was compiled against numpy 2 (transformers would import
# scipy/sklearn and fail), behind the venv's own numpy 1.26.
mkdir -p /tmp/syssite
deny='^(numpy|scipy|sklearn|scikit_learn|pandas|matplotlib|numba|cupy|jax|jaxlib|pyarrow|h5py|skimage|scikit_image|cv2|opencv|statsmodels|seaborn|xarray|tensorstore|sentence_transformers)([-_.].*)?$'
for entry in "$system_site"/*; do
  name=$(basename "$entry")
  [[ $name =~ $deny ]] || ln -sfn "$entry" "/tmp/syssite/$name"
done
echo /tmp/syssite > "$site/system-packages.pth"
echo "$(pwd)" > "$site/flux-triton.pth"
tar xJf "$triton" -C "$site"
tar xJf "$stubs" -C "$site"
