#!/usr/bin/env bash
# Install the reference tools (real peers for tests and benchmarks) from Debian packages,
# only those that are missing.  Needs root (or sudo) the first time; a no-op afterwards.
set -euo pipefail

# command-or-file -> Debian package
declare -A PEERS=(
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [qemu-nbd]=qemu-utils
  [cryptsetup]=cryptsetup-bin
  [nbdkit]=nbdkit
  [/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-python-plugin.so]=nbdkit-plugin-python
  [nbdinfo]=libnbd-bin
  [nbdcopy]=libnbd-bin
  [nbdsh]=libnbd-bin
  [/usr/lib/python3/dist-packages/nbd.py]=python3-libnbd
  # imageformats' runtime deps for the system python3 that nbdkit's python plugin embeds
  [/usr/lib/python3/dist-packages/cryptography]=python3-cryptography
  [/usr/lib/python3/dist-packages/construct]=python3-construct
  [/usr/lib/python3/dist-packages/zstandard]=python3-zstandard
  [/usr/lib/python3/dist-packages/numpy]=python3-numpy
  [/usr/lib/python3/dist-packages/crcmod]=python3-crcmod
  [/usr/lib/python3/dist-packages/xxhash]=python3-xxhash
  [xz]=xz-utils
  [zstd]=zstd
  [gzip]=gzip
  [pigz]=pigz
  [nginx]=nginx-light
  [sfdisk]=fdisk
  [mke2fs]=e2fsprogs
  [debugfs]=e2fsprogs
)

missing=()
for probe in "${!PEERS[@]}"; do
  if [[ $probe == /* ]]; then
    [[ -e $probe ]] || missing+=("${PEERS[$probe]}")
  else
    command -v "$probe" >/dev/null 2>&1 || [[ -x /usr/sbin/$probe || -x /sbin/$probe ]] || missing+=("${PEERS[$probe]}")
  fi
done
# python3-libnbd for the system python3, which nbdkit's python plugin embeds
[[ ${#missing[@]} -eq 0 ]] && exit 0

mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "install-peers: installing ${packages[*]}" >&2
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
