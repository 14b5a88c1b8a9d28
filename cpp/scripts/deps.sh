#!/usr/bin/env bash
# The C++ runtime's dependencies, from the registries these machines reach, pinned (make cpp runs this):
#   - libsentencepiece-dev, nlohmann-json3-dev: Debian packages (apt-get install, as root)
#   - onnxruntime's C/C++ headers: Debian 13's libonnxruntime-dev 1.21.0+dfsg-1. On Debian 13 it is installed like
#     the others; on Debian 12 (no such package) the .deb is downloaded from the trixie suite with a private
#     sources list and state folder under $OUT (nothing of the system's apt is touched), its sha256 checked,
#     and only its headers extracted there (dpkg -x: no install)
#   - libonnxruntime.so.1: linked to the onnxruntime wheel's library that the project's venv already has (the C
#     API is backward compatible: 1.21 headers drive the wheel's 1.32 library)
# Usage: deps.sh OUT PYTHON  -> OUT/include/onnxruntime_cxx_api.h, OUT/lib/libonnxruntime.so.1
set -euo pipefail
OUT=$(realpath -m "$1")
PY=$2
ORT_DEB=libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
ORT_DEB_SHA256=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
mkdir -p "$OUT/include" "$OUT/lib"

missing=()
for pkg in libsentencepiece-dev nlohmann-json3-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "deps.sh: needs the Debian packages ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
    exit 2
  fi
  echo "deps.sh: apt-get install ${missing[*]}" >&2
  apt-get install -y -q "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

if [ ! -f "$OUT/include/onnxruntime_cxx_api.h" ]; then
  if [ -f /usr/include/onnxruntime/onnxruntime_cxx_api.h ]; then
    cp /usr/include/onnxruntime/*.h "$OUT/include/"
  else
    APT="$OUT/apt"
    mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
    echo "deb http://deb.debian.org/debian trixie main" > "$APT/sources.list"
    opts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o Debug::NoLocking=1)
    if [ ! -f "$APT/$ORT_DEB" ]; then
      echo "deps.sh: downloading $ORT_DEB (Debian trixie) for onnxruntime's headers" >&2
      apt-get "${opts[@]}" update -q >/dev/null
      (cd "$APT" && apt-get "${opts[@]}" download -q "libonnxruntime-dev=1.21.0+dfsg-1" >/dev/null 2>&1)
    fi
    echo "$ORT_DEB_SHA256  $APT/$ORT_DEB" | sha256sum -c --quiet - || { echo "deps.sh: $ORT_DEB: sha256 differs" >&2; exit 2; }
    rm -rf "$APT/x" && dpkg -x "$APT/$ORT_DEB" "$APT/x"
    cp "$APT"/x/usr/include/onnxruntime/*.h "$OUT/include/"
  fi
fi

LIB=$("$PY" -c "import glob, os, onnxruntime; d = os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'); print(sorted(glob.glob(os.path.join(d, 'libonnxruntime.so.1*')))[-1])")
if [ "$(readlink "$OUT/lib/libonnxruntime.so.1" 2>/dev/null)" != "$LIB" ]; then
  ln -sf "$LIB" "$OUT/lib/libonnxruntime.so.1"
  echo "deps.sh: onnxruntime headers in $OUT/include; $(basename "$LIB") linked as $OUT/lib/libonnxruntime.so.1" >&2
fi
