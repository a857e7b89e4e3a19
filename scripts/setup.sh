# Shared set-up for scripts/run.sh and scripts/test.sh (sourced, not run): idempotent.
# Makes .venv with the project installed; as root on Debian, installs the apt packages it needs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

say() { echo "setup: $*" >&2; }

apt_install() {  # apt_install PKG... : only what is missing, only as root on a Debian-like host
    local missing=()
    for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        say "not root (or no apt-get): skipping the install of ${missing[*]}"
        return 1
    fi
    say "installing ${missing[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { say "$PY is older than 3.11: set PYTHON=/path/to/python3.11"; exit 5; }
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv || { say "$PY cannot make a venv: install python3-venv"; exit 5; }
fi

# Without PyPI (a patched host with no network), the same packages come from Debian.
DEBIAN_PACKAGES=(python3-click python3-rich python3-numpy python3-pytest python3-hypothesis
                 python3-pyelftools python3-setuptools python3-wheel)

install_project() {
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    say "installing dynvm-trace and its test tools into $VENV"
    if "$VENV/bin/python" -m pip install -q --disable-pip-version-check --retries 1 --timeout 20 \
            -e "$ROOT[test]"; then
        return 0
    fi
    say "PyPI cannot be reached: using Debian's packages instead (${DEBIAN_PACKAGES[*]})"
    apt_install "${DEBIAN_PACKAGES[@]}" || true
    rm -rf "$VENV"
    "$PY" -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-index --no-deps \
        --no-build-isolation -e "$ROOT" \
        || { say "cannot install dynvm-trace: install ${DEBIAN_PACKAGES[*]} and run this again"; exit 5; }
    "$VENV/bin/python" -c 'import click, rich, numpy' 2>/dev/null \
        || { say "$PY lacks click, rich or numpy: install ${DEBIAN_PACKAGES[*]}"; exit 5; }
}

stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
if [ ! -e "$stamp" ]; then
    install_project
    rm -f "$VENV"/.installed-* && touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"

# Live tracing (the ksm source): bcc, kernel headers, tracefs. Root only; without root the
# emulated and replay sources still work.
if [ "$(id -u)" -ne 0 ]; then
    say "not root: skipping the live-tracing set-up (bcc, headers, tracefs); the emulated source works"
else
    apt_install python3-bpfcc bpftrace linux-perf || true
    kver="$(uname -r)"
    if [ ! -e "/lib/modules/$kver/build/include" ]; then
        apt_install "linux-headers-$kver" 2>/dev/null || apt_install linux-headers-amd64 || true
    fi
    if [ ! -e "/lib/modules/$kver/build/include" ]; then
        # No headers for this kernel: link the newest installed ones (tracepoint probes take
        # their argument structs from tracefs, so another version's headers compile them).
        hdr="$(ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 2>/dev/null | sort -V | tail -1 || true)"
        if [ -n "$hdr" ]; then
            mkdir -p "/lib/modules/$kver"
            ln -sfn "$hdr" "/lib/modules/$kver/build"
            common="${hdr%-*}-common"
            [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$kver/source"
            say "no headers for $kver: linked /lib/modules/$kver/build -> $hdr (and source -> $common)"
        else
            say "no kernel headers installed: bcc cannot compile probes (install linux-headers-amd64)"
        fi
    fi
    mountpoint -q /sys/kernel/tracing || { mount -t tracefs nodev /sys/kernel/tracing && say "mounted tracefs"; } || true
    mountpoint -q /sys/kernel/debug || { mount -t debugfs nodev /sys/kernel/debug && say "mounted debugfs"; } || true
fi
# bcc is Debian's python3-bpfcc, outside this venv's Python (unless it is Debian's python3):
# a .pth file puts a directory holding only a link to bcc on sys.path, not every Debian package.
if [ -d /usr/lib/python3/dist-packages/bcc ] && ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$VENV/debian-bcc"
    ln -sfn /usr/lib/python3/dist-packages/bcc "$VENV/debian-bcc/bcc"
    echo "$VENV/debian-bcc" > "$site/dynvm-bcc.pth"
fi
