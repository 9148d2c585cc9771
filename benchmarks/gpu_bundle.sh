#!/usr/bin/env bash
# The GPU bundle for an offline GPU machine that has only torch: .whl/gpu_bundle.tar.xz (tritonserver
# 2.51 with the Python 3.12 stub, numpy 1.26 for the model environment, diffusers, torchao,
# tritonclient, onnxscript, peft, accelerate) and .whl/install.sh that unpacks it there, built here from PyPI wheels (25 MB).
#
#   bash benchmarks/gpu_bundle.sh [OUT_DIR]       (default OUT_DIR: .whl, from the repository root)
#
# Needs here: python3 with pip (any version; wheels are fetched for cp312 manylinux x86_64),
# binutils (strip, nm), file, unzip, gcc (for the ICU data stub), GNU tar, xz. ~0.7 GB in $WORK, ~2.5 min
# on 2 cores (most of it xz -9e).
# Options (environment):
#   KEEP_ICU=1          keep the real 29 MB libicudata (+7.1 MB compressed) instead of the stub
#   KEEP_TORCHAO_C=1    keep torchao's compiled kernels _C_cutlass_90a / _C_mxfp8 (+~0.6 MB compressed)
#   WORK=/tmp/gpu_bundle_build   scratch folder (wiped)
set -euo pipefail
OUT=$(realpath -m "${1:-.whl}")
WORK=${WORK:-/tmp/gpu_bundle_build}
KEEP_ICU=${KEEP_ICU:-0}
KEEP_TORCHAO_C=${KEEP_TORCHAO_C:-0}

# Exact pins. cp312 manylinux x86_64 where compiled.
WHEELS=(
  nvidia-pytriton==0.7.0      # tritonserver 2.51 build + python backend (py3-none-manylinux_2_35_x86_64)
  numpy==1.26.4               # model env only (the python backend stub breaks with numpy 2)
  ml-dtypes==0.5.4            # model env only: tritonclient.utils imports it; tritonclient pins <=0.5.4
  diffusers==0.42.1
  torchao==0.18.0             # cp310-abi3, needs torch>=2.11
  importlib-metadata==10.2.0  # diffusers needs it; it needs zipp>=3.20 and lazy-importer (py<3.15)
  zipp==4.1.2
  lazy-importer==0.1.0
  tritonclient==2.73.0        # pure python; [grpc] extra: grpcio>=1.81.1, protobuf>=6.30 (image), python-rapidjson
  python-rapidjson==1.25
  onnxscript==0.7.2           # pure python: torch.onnx.export(dynamo=True) for make export-full-size
  onnx-ir==1.1.0              # pure python: onnxscript's IR
  peft==0.21.2                # pure python: LoRA adapters, loaded by diffusers' FLUX loader
  accelerate==1.16.0          # pure python: peft and diffusers' loaders import it
  psutil==7.2.2               # cp36-abi3: accelerate imports it
)
PLATFORMS=(manylinux_2_35_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any)

rm -rf "$WORK"; mkdir -p "$WORK/whl" "$WORK/raw" "$WORK/stage/site" "$WORK/stage/np126" "$OUT"
cd "$WORK"
pargs=(); for p in "${PLATFORMS[@]}"; do pargs+=(--platform "$p"); done
for w in "${WHEELS[@]}"; do
  w=${w%%#*}; w=${w// /}
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${pargs[@]}" -d whl "$w"
done
ls -l whl
sha256sum whl/*.whl > whl/SHA256SUMS

for w in whl/*.whl; do n=$(basename "$w" | cut -d- -f1); mkdir -p "raw/$n"; unzip -q -o "$w" -d "raw/$n"; done

# ---- np126/: only for the model venv (numpy 1.26.4 + ml_dtypes 0.5.4 built for it)
cp -a raw/numpy/. raw/ml_dtypes/. stage/np126/
( cd stage/np126
  find numpy -depth -type d -name tests -exec rm -rf {} +        # test suites (never imported)
  find numpy ml_dtypes -name '*.pyi' -delete                      # type stubs
  rm -rf numpy/f2py numpy/_pyinstaller numpy/conftest.py          # Fortran wrapper generator, pyinstaller hooks
  rm -f numpy/core/_simd.cpython-312-x86_64-linux-gnu.so          # SIMD test module (numpy/core/tests only)
  rm -f numpy/*.pxd                                               # cython headers
  rm -rf numpy/core/include numpy/core/lib/*.a numpy/random/lib/*.a numpy/core/lib/npy-pkg-config \
         numpy/random/_examples numpy/core/include                # C headers / static libs / examples
  rm -rf ml_dtypes/tests )

# ---- site/: usable by both the model venv (via .pth) and the image's python3 (via PYTHONPATH)
for p in diffusers torchao importlib_metadata zipp lazy_importer tritonclient python_rapidjson nvidia_pytriton \
         onnxscript onnx_ir peft accelerate psutil; do
  cp -a "raw/$p/." stage/site/
done
cd stage/site
rm -rf test                                                    # torchao's wheel ships its test suite at top level
rm -rf rapidjson-stubs
[ "$KEEP_TORCHAO_C" = 1 ] || rm -f torchao/_C*.so                # unused by Float8DynamicActivationFloat8Weight
# tritonserver build: keep bin/, backends/python/, caches/local/, the 3.12 stub; drop the other stubs and
# the bundled libpython3.13 (only the 3.13 stub uses it).
T=pytriton/tritonserver
for v in 3.8 3.9 3.10 3.11 3.13; do rm -rf "$T/python_backend_stubs/$v"; done
rm -f nvidia_pytriton.libs/libpython3-*.13.so*
# The stub beside libtriton_python.so (same depth as python_backend_stubs/3.12, so its RPATH still works);
# a hard link: stored once in the tar.
ln -f "$T/python_backend_stubs/3.12/triton_python_backend_stub" "$T/backends/python/triton_python_backend_stub"
# pytriton's Python API (pytriton.triton/client/proxy/...) needs gevent, geventhttpclient, pyzmq, sh, ...:
# not shipped. The project only locates the build through importlib.util.find_spec("pytriton").
find pytriton -mindepth 1 -maxdepth 1 ! -name tritonserver -exec rm -rf {} +
cat > pytriton/__init__.py <<'EOF'
"""nvidia-pytriton 0.7.0, slimmed for the GPU bundle: only the tritonserver 2.51 build in
pytriton/tritonserver/ (bin/, backends/python/, caches/local/, python_backend_stubs/3.12/), with its
libraries in ../nvidia_pytriton.libs/. The pytriton Python API (pytriton.triton, pytriton.client, ...)
is not included."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nvidia-pytriton")
except PackageNotFoundError:  # pragma: no cover
    pass
EOF
# ICU data (29 MB): libtritonserver -> libxml2 -> libicuuc -> libicudata. libxml2 calls ICU only to convert
# non-UTF-8 XML (cloud-storage responses); a local model repository never does. The stub exports the same
# symbol (icudt70_dat) holding a valid ICU common-data header with an empty table of contents, so any ICU data
# lookup fails cleanly (U_MISSING_RESOURCE_ERROR / U_FILE_ACCESS_ERROR) instead of crashing.
if [ "$KEEP_ICU" != 1 ]; then
  icu=(nvidia_pytriton.libs/libicudata-*.so.*)
  python3 - "${icu[0]}" "$WORK/icudata_stub.c" <<'EOF'
import struct, subprocess, sys
lib, out = sys.argv[1:]
data = open(lib, 'rb').read()
# virtual address of icudt70_dat -> file offset through the PT_LOAD headers
sym = subprocess.run(['nm', '-D', '--defined-only', lib], capture_output=True, text=True, check=True).stdout.split()
name = next(s for s in sym if s.startswith('icudt'))
addr = int(sym[sym.index(name) - 2], 16)
phoff, = struct.unpack_from('<Q', data, 0x20); phentsize, phnum = struct.unpack_from('<HH', data, 0x36)
for i in range(phnum):
    p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from('<IIQQQQ', data, phoff + i * phentsize)
    if p_type == 1 and p_vaddr <= addr < p_vaddr + p_filesz:
        off = addr - p_vaddr + p_offset
hs, = struct.unpack_from('<H', data, off)
assert data[off + 2:off + 4] == b'\xda\x27' and data[off + 12:off + 16] == b'CmnD', 'not ICU common data'
blob = data[off:off + hs] + b'\0\0\0\0'   # header + TOC entry count 0
open(out, 'w').write('/* ICU common-data header with an empty table of contents */\n'
                     '__attribute__((visibility("default"), aligned(16))) const unsigned char %s[%d] = {%s};\n'
                     % (name, len(blob), ','.join(map(str, blob))))
print(name, 'header', hs, 'bytes')
EOF
  soname=$(basename "${icu[0]}")
  gcc -O2 -shared -fPIC -nostdlib -Wl,-soname,"$soname" -Wl,--hash-style=both -o "${icu[0]}" "$WORK/icudata_stub.c"
  strip --strip-unneeded "${icu[0]}"
fi
cd "$WORK"

# ---- strip debug symbols, only from ELF files that still have them (auditwheel-grafted libs are already
# stripped; re-stripping those only re-lays them out and makes them bigger).
find stage -type f \( -name '*.so*' -o -path '*/bin/*' -o -name triton_python_backend_stub \) | sort | while read -r f; do
  if file "$f" | grep -q 'ELF.*not stripped'; then
    a=$(stat -c %s "$f"); strip --strip-unneeded "$f"; echo "stripped $(( (a - $(stat -c %s "$f")) / 1024 )) KiB  $f"
  fi
done
find stage -name __pycache__ -prune -exec rm -rf {} +
chmod -R u+rwX,go+rX,go-w stage
chmod 755 stage/site/pytriton/tritonserver/bin/tritonserver stage/site/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub

# ---- one tar, xz -9e with the x86 BCJ filter (-1.3 MB on the ELF part; neutral on text)
du -sb stage/site stage/np126
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C stage -cf bundle.tar site np126
xz --x86 --lzma2=preset=9e -T1 -c bundle.tar > "$OUT/gpu_bundle.tar.xz"
xz -t "$OUT/gpu_bundle.tar.xz"
cat > "$OUT/install.sh" <<'INSTALL'
#!/usr/bin/env bash
# Unpack .whl/gpu_bundle.tar.xz on the GPU machine; no network. Run from the repo root:
#   bash .whl/install.sh              model venv $MENV (default /tmp/menv: numpy 1.26.4, ml_dtypes 0.5.4, the
#                                     image's other packages through a filtered symlink farm $SYSSITE, the repo
#                                     root) + $SITE (default /tmp/site: diffusers 0.42.1, torchao 0.18.0,
#                                     tritonclient 2.73.0 + python-rapidjson, importlib_metadata, zipp,
#                                     lazy_importer, and pytriton/tritonserver = tritonserver 2.51 + 3.12 stub)
#   bash .whl/install.sh --site-only  only $SITE, for the image's own python3 (numpy 2):
#                                     export PYTHONPATH=/tmp/site
# Then put /tmp/menv/bin first on PATH (source /tmp/menv/bin/activate) before starting tritonserver, so the
# python backend stub embeds the venv; flux_triton.tritonserver adds the libpython LIBDIR itself.
# Env: PYTHON (default python3: the image's 3.12), MENV, SITE, SYSSITE, CHECK=0 to skip the self-check.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(pwd)
PY=${PYTHON:-python3}
MENV=${MENV:-/tmp/menv} SITE=${SITE:-/tmp/site} SYSSITE=${SYSSITE:-/tmp/syssite}
site_only=0; [ "${1:-}" = --site-only ] && site_only=1
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), "the bundle is built for CPython 3.12, not " + sys.version'

tmp=$(mktemp -d /tmp/gpu_bundle.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if command -v xz >/dev/null 2>&1; then
  tar -xJf "$here/gpu_bundle.tar.xz" -C "$tmp"
else  # no xz binary: python's lzma reads the same .xz (BCJ x86 + LZMA2)
  "$PY" -c 'import sys, tarfile
t = tarfile.open(sys.argv[1], "r:xz")
t.extractall(sys.argv[2], **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))' "$here/gpu_bundle.tar.xz" "$tmp"
fi
rm -rf "$SITE"; mkdir -p "$(dirname "$SITE")"; mv "$tmp/site" "$SITE"
stub=$SITE/pytriton/tritonserver/backends/python/triton_python_backend_stub
server=$SITE/pytriton/tritonserver/bin/tritonserver
[ -x "$stub" ] && [ -x "$server" ] || { echo "install.sh: tritonserver build incomplete" >&2; exit 1; }

if [ "$site_only" = 0 ]; then
  rm -rf "$MENV" "$SYSSITE"
  "$PY" -m venv --without-pip "$MENV"
  vsite=$("$MENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp -a "$tmp/np126/." "$vsite/"
  # The image's packages, minus numpy, what is compiled against numpy 2 (transformers would import
  # scipy/sklearn and fail) and what the bundle ships itself.
  system_site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$SYSSITE"
  deny='^(numpy|ml_dtypes|scipy|sklearn|scikit_learn|pandas|matplotlib|numba|cupy|jax|jaxlib|pyarrow|h5py|skimage|scikit_image|cv2|opencv|statsmodels|seaborn|xarray|tensorstore|sentence_transformers|diffusers|torchao|tritonclient|tritonclientutils|tritongrpcclient|tritonhttpclient|tritonshmutils|rapidjson|python_rapidjson|pytriton|nvidia_pytriton|importlib_metadata|zipp|lazy_importer|peft|accelerate|psutil)([-_.].*)?$'
  for entry in "$system_site"/*; do
    name=$(basename "$entry")
    [[ $name =~ $deny ]] || ln -sfn "$entry" "$SYSSITE/$name"
  done
  echo "$SITE" > "$vsite/00-gpu-bundle.pth"          # .pth files are read in name order
  echo "$SYSSITE" > "$vsite/10-system-packages.pth"
  echo "$repo" > "$vsite/20-flux-triton.pth"
fi

if [ "${CHECK:-1}" = 1 ]; then
  libdir=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
  if LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$stub" "$server" | grep 'not found'; then
    echo "install.sh: WARNING: unresolved libraries above (libpython3.12.so.1.0 must be in LIBDIR=$libdir)" >&2
  fi
  rc=0; "$server" --help >/dev/null 2>&1 || rc=$?
  [ "$rc" = 1 ] || { echo "install.sh: tritonserver --help exited $rc (expected 1): it does not load" >&2; exit 1; }
  if [ "$site_only" = 0 ]; then checkpy=("$MENV/bin/python"); else checkpy=(env PYTHONPATH="$SITE" "$PY"); fi
  "${checkpy[@]}" - "$site_only" <<'PYCHECK'
import sys, importlib.metadata as md
import numpy, torch, grpc, google.protobuf, ml_dtypes
import pytriton, diffusers, torchao, tritonclient.grpc
from diffusers import FluxPipeline, FluxTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
import diffusers.models.transformers.transformer_flux
from torchao.quantization import quantize_, Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor
if sys.argv[1] == "0":
    assert numpy.__version__ == "1.26.4", numpy.__version__
print("install.sh check:", sys.executable, "python", sys.version.split()[0], "| numpy", numpy.__version__,
      "| torch", torch.__version__, "| diffusers", diffusers.__version__, "| torchao", torchao.__version__,
      "| tritonclient", md.version("tritonclient"), "| grpcio", grpc.__version__,
      "| protobuf", google.protobuf.__version__, "| ml_dtypes", ml_dtypes.__version__,
      "| pytriton", pytriton.__file__)
PYCHECK
fi
echo "installed: SITE=$SITE$([ "$site_only" = 0 ] && echo " MENV=$MENV (then: source $MENV/bin/activate)")"
INSTALL
chmod +x "$OUT/install.sh"
( cd "$OUT" && sha256sum gpu_bundle.tar.xz > SHA256SUMS )
ls -l "$OUT"; du -sb "$OUT"
