# shellcheck shell=bash
# Shared by scripts/demo, scripts/test and scripts/bench-local: install what
# diskferry's scripts need, only when it is missing. Source it, then call
# `ensure_deps`. Safe to call more than once (apt-get update runs at most once).
#
# Debian 12 packages and what we use from them:
#   nbdkit      nbdkit + the memory, pattern, data, sparse-random plugins and
#               the error filter (all in the main nbdkit package)
#   libnbd-bin  nbdcopy, nbdinfo (peer and reference client), nbdfuse (an
#               NBD export as a file: the failing disk of tests/target_eio.rs)
#   qemu-utils  qemu-nbd, qemu-img
#   e2fsprogs   mkfs.ext4 (sample images)      diffutils  cmp
#   time        /usr/bin/time: each benchmarked tool's peak RSS (bench_measure.py)
#   rsync       only scripts/bench-net --incremental (ensure_rsync): the delta peer
#   gnuplot-nox the plots of scripts/bench-report (ensure_report_deps, which
#               also ensures rsync: the report runs --incremental)

_DF_APT_UPDATED=0

_df_log() { printf '==> %s\n' "$*" >&2; }

_df_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        _df_log "need root (or sudo) to run: $*"
        return 1
    fi
}

# _df_apt_install PKG... — apt-get update once per shell, then install.
_df_apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ "$_DF_APT_UPDATED" -eq 0 ]; then
        _df_log "apt-get update"
        _df_as_root apt-get update -qq </dev/null
        _DF_APT_UPDATED=1
    fi
    _df_log "apt-get install -y $*"
    _df_as_root apt-get install -y -qq --no-install-recommends "$@" </dev/null
}

# nbdkit plugins/filters the tests use; all ship in the nbdkit package on
# Debian 12, but check each so a minimal or split packaging is caught early.
_df_nbdkit_ok() {
    command -v nbdkit >/dev/null 2>&1 || return 1
    local p
    for p in memory pattern data sparse-random; do
        nbdkit "$p" --dump-plugin >/dev/null 2>&1 || return 1
    done
    # A filter loads only with a plugin; --dump-config would not check it.
    nbdkit --filter=error null --dump-plugin >/dev/null 2>&1 || return 1
}

# ensure_cargo — put ~/.cargo/bin on PATH if needed and check cargo exists.
# Debian 12's own cargo (1.63) is too old for edition 2024, so we do not
# apt-get it; a rustup toolchain (1.85 or newer) is expected.
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        _df_log "cargo not found: install a Rust toolchain >= 1.85 (https://rustup.rs) and re-run"
        return 1
    fi
}

# ensure_deps — install missing system packages, then check cargo.
ensure_deps() {
    local missing=()
    _df_nbdkit_ok || missing+=(nbdkit)
    command -v nbdcopy >/dev/null 2>&1 || missing+=(libnbd-bin)
    command -v nbdinfo >/dev/null 2>&1 || missing+=(libnbd-bin)
    command -v nbdfuse >/dev/null 2>&1 || missing+=(libnbd-bin)
    command -v qemu-nbd >/dev/null 2>&1 || missing+=(qemu-utils)
    command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
    command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
    command -v cmp >/dev/null 2>&1 || missing+=(diffutils)
    [ -x /usr/bin/time ] || missing+=(time)  # the benchmarks' peak RSS (scripts/lib/bench_measure.py)
    if [ "${#missing[@]}" -gt 0 ]; then
        # de-duplicate, keep order
        local uniq=() m u seen
        for m in "${missing[@]}"; do
            seen=0
            for u in "${uniq[@]}"; do [ "$u" = "$m" ] && seen=1; done
            [ "$seen" -eq 0 ] && uniq+=("$m")
        done
        _df_apt_install "${uniq[@]}"
        if ! _df_nbdkit_ok; then
            _df_log "nbdkit is installed but a plugin/filter is missing (need memory, pattern, data, sparse-random, error)"
            return 1
        fi
    fi
    # mkfs.ext4 lives in /sbin, which a non-root PATH may lack.
    case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin:/sbin" ;; esac
    # scripts/bench-report's plots (and tests/bench_report.rs, run by scripts/test)
    ensure_report_deps
    ensure_cargo
}

# ensure_rsync — rsync (the delta peer of scripts/bench-net --incremental).
ensure_rsync() {
    command -v rsync >/dev/null 2>&1 || _df_apt_install rsync
}

# ensure_report_deps — what scripts/bench-report needs beyond ensure_deps:
# gnuplot (gnuplot-nox: no X11) for the plots, rsync for its --incremental
# scenario, iproute2 (ip, tc, ss) for its --link scenario's namespaces and
# tbf shaping (tests/bench_report.rs runs them all).
ensure_report_deps() {
    command -v gnuplot >/dev/null 2>&1 || _df_apt_install gnuplot-nox
    ensure_rsync
    { command -v ip && command -v tc && command -v ss; } >/dev/null 2>&1 || _df_apt_install iproute2
}
