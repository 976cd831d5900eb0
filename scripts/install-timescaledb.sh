#!/usr/bin/env bash
# Make TimescaleDB (Apache-2 edition) available on the local PostgreSQL.
#
# No registry ships a TimescaleDB build for Debian's PostgreSQL, so this builds
# Debian 13's source package against the running server. A second run finds the
# extension installed and preloaded and returns in well under a second.
# Works on Debian 12 and 13; the machine's own apt sources are never modified.
set -euo pipefail

PGHOST="${PGHOST:-127.0.0.1}"
PGPORT="${PGPORT:-5432}"
PGUSER="${PGUSER:-postgres}"
psql_q() { psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -XAtqc "$1"; }

major="$(psql_q 'show server_version_num')"
major="$((major / 10000))"
pg_config="/usr/lib/postgresql/${major}/bin/pg_config"
extdir="/usr/share/postgresql/${major}/extension"

preloaded() { psql_q 'show shared_preload_libraries' | tr ', ' '\n\n' | grep -qx timescaledb; }

if [[ -f "${extdir}/timescaledb.control" ]] && preloaded; then
    echo "timescaledb: installed and preloaded on PostgreSQL ${major}"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    echo "timescaledb: building needs root (apt-get, make install, restarting PostgreSQL)" >&2
    exit 1
fi

work="$(mktemp -d /tmp/timescaledb-build.XXXXXX)"
trap 'rm -rf "$work"' EXIT
export DEBIAN_FRONTEND=noninteractive

# The mirror the machine already uses (deb822 or one-line format).
mirror="$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | grep -E '^[[:space:]]*(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian/?( |$)' \
    | tr -d ' ' | head -n1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
mirror="${mirror%/}"

private_apt() {
    # apt-get with a private source list and state, leaving the machine's apt untouched.
    mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial"
    apt-get -q -oDir::Etc::SourceList="$work/apt/sources.list" -oDir::Etc::SourceParts=/dev/null \
        -oDir::State::Lists="$work/apt/lists" -oDir::Cache::Archives="$work/apt/archives" \
        -oAPT::Sandbox::User=root "$@"
}

if [[ -f "${extdir}/timescaledb.control" ]]; then
    echo "timescaledb: extension files present, only preloading"
else
    echo "timescaledb: building the Apache edition for PostgreSQL ${major}"
    apt-get -q update >/dev/null
    pkgs=(cmake build-essential dpkg-dev libssl-dev)
    candidate="$(apt-cache policy "postgresql-server-dev-${major}" | sed -n 's/ *Candidate: //p')"
    if [[ -n "$candidate" && "$candidate" != "(none)" ]]; then
        pkgs+=("postgresql-server-dev-${major}")
    fi
    apt-get -q install -y --no-install-recommends "${pkgs[@]}" >/dev/null
    if [[ ! -f "/usr/include/postgresql/${major}/server/postgres.h" ]]; then
        # The server is older than this Debian's own PostgreSQL (Debian 13 with 15): its headers
        # come from Debian 12. Only the build reads them, so unpack them in place rather than
        # installing a package whose dependencies belong to another release.
        mkdir -p "$work/apt"
        echo "deb ${mirror} bookworm main" >"$work/apt/sources.list"
        private_apt update >/dev/null
        (cd "$work" && private_apt download "postgresql-server-dev-${major}" >/dev/null)
        dpkg-deb -x "$work"/postgresql-server-dev-"${major}"_*.deb "$work/headers"
        cp -a "$work/headers/usr/." /usr/
    fi

    mkdir -p "$work/apt"
    echo "deb-src ${mirror} trixie main" >"$work/apt/sources.list"
    rm -rf "$work/apt/lists"
    private_apt update >/dev/null
    (cd "$work" && private_apt source --download-only timescaledb >/dev/null)
    (cd "$work" && dpkg-source -x --no-check timescaledb_*.dsc src >/dev/null)

    (cd "$work/src" && ./bootstrap -DPG_CONFIG="$pg_config" -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF \
        -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF -DLINTER=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null)
    make -C "$work/src/build" -j"$(nproc)" install >/dev/null
fi

if ! preloaded; then
    current="$(psql_q 'show shared_preload_libraries')"
    wanted="${current:+${current}, }timescaledb"
    psql_q "alter system set shared_preload_libraries = '${wanted}'" >/dev/null
    pg_ctlcluster --skip-systemctl-redirect "$major" main restart
    for _ in $(seq 1 60); do
        pg_isready -q -h "$PGHOST" -p "$PGPORT" && break
        sleep 0.5
    done
fi
echo "timescaledb: ready ($(psql_q "select default_version from pg_available_extensions where name = 'timescaledb'"))"
