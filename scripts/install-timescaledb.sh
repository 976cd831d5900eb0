#!/usr/bin/env bash
# Make TimescaleDB 2.28.3, community edition (columnstore, continuous aggregates, policy jobs),
# available on the local PostgreSQL.
#
# No registry ships a community build for Debian's PostgreSQL, so this builds the release source
# against the running server: the tarball named by TIMESCALEDB_TARBALL, else
# ../shared/timescaledb-2.28.3.tar.gz beside the checkout when it exists, else the tag's source
# from TimescaleDB's GitHub repository. It replaces an Apache-only or older build in place (the
# versioned libraries of older releases stay: databases still on them keep working until their
# migration updates them), keeps shared_preload_libraries as it was plus timescaledb, and
# restarts PostgreSQL at most once. A second run finds everything in place in well under a second.
# 2.28 is the last release line that supports PostgreSQL 15.
set -euo pipefail

VERSION="2.28.3"
SHA256="ec2f7de0ba53a473c01e0a57e09053898c6b1f7487228caff0f1d31c8cb2dedb"
PGHOST="${PGHOST:-127.0.0.1}"
PGPORT="${PGPORT:-5432}"
PGUSER="${PGUSER:-postgres}"
here="$(cd "$(dirname "$0")/.." && pwd)"
psql_q() { psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -XAtqc "$1"; }

major="$(psql_q 'show server_version_num')"
major="$((major / 10000))"
pg_config="/usr/lib/postgresql/${major}/bin/pg_config"
extdir="/usr/share/postgresql/${major}/extension"
libdir="/usr/lib/postgresql/${major}/lib"

preloaded() { psql_q 'show shared_preload_libraries' | tr ', ' '\n\n' | grep -qx timescaledb; }
# The community edition: the tsl library of this version, and the control file defaulting to it.
built() {
    [[ -f "${libdir}/timescaledb-tsl-${VERSION}.so" && -f "${extdir}/timescaledb--${VERSION}.sql" ]] \
        && grep -q "default_version = '${VERSION}'" "${extdir}/timescaledb.control"
}
# The community edition reports usage to Timescale unless told not to; our machines (and many
# hospital networks) have no way out, and a service should not phone home by default.
# The setting exists only where the extension is loaded, so it goes to a file of the cluster's
# conf.d (Debian's postgresql.conf includes that folder), which takes placeholders.
confdir="$(dirname "$(psql_q 'show config_file')")/conf.d"
telemetry_conf="${confdir}/timescaledb-telemetry.conf"
telemetry_off() { grep -qsx "timescaledb.telemetry_level = off" "$telemetry_conf"; }

if built && preloaded && telemetry_off; then
    echo "timescaledb: ${VERSION} (community) installed and preloaded on PostgreSQL ${major}"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    echo "timescaledb: building needs root (apt-get, make install, restarting PostgreSQL)" >&2
    exit 1
fi

work="$(mktemp -d /tmp/timescaledb-build.XXXXXX)"
trap 'rm -rf "$work"' EXIT
export DEBIAN_FRONTEND=noninteractive

source_tarball() {
    if [[ -n "${TIMESCALEDB_TARBALL:-}" ]]; then
        echo "$TIMESCALEDB_TARBALL"
    elif [[ -f "${here}/../shared/timescaledb-${VERSION}.tar.gz" ]]; then
        echo "${here}/../shared/timescaledb-${VERSION}.tar.gz"
    else
        curl -fsSL -o "$work/src.tar.gz" \
            "https://github.com/timescale/timescaledb/archive/refs/tags/${VERSION}.tar.gz"
        echo "$work/src.tar.gz"
    fi
}

fresh=false
if built; then
    echo "timescaledb: ${VERSION} present"
else
    fresh=true
    tarball="$(source_tarball)"
    echo "timescaledb: building ${VERSION} (community edition) from ${tarball} for PostgreSQL ${major}"
    if ! echo "${SHA256}  ${tarball}" | sha256sum -c --quiet - 2>/dev/null; then
        echo "timescaledb: ${tarball} is not the ${VERSION} source (SHA-256 differs)" >&2
        exit 1
    fi
    if [[ ! -f "/usr/include/postgresql/${major}/server/postgres.h" ]] || ! command -v cmake >/dev/null; then
        apt-get -q update >/dev/null
        apt-get -q install -y --no-install-recommends cmake build-essential libssl-dev \
            "postgresql-server-dev-${major}" >/dev/null
    fi
    mkdir -p "$work/src"
    tar -xzf "$tarball" -C "$work/src" --strip-components=1
    (cd "$work/src" && ./bootstrap -DPG_CONFIG="$pg_config" -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
        -DWARNINGS_AS_ERRORS=OFF -DLINTER=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null)
    make -C "$work/src/build" -j"$(nproc)" install >/dev/null
fi

# A freshly installed loader is loaded only by a restart.
restart="$fresh"
if ! preloaded; then
    current="$(psql_q 'show shared_preload_libraries')"
    psql_q "alter system set shared_preload_libraries = '${current:+${current}, }timescaledb'" >/dev/null
    restart=true
fi
if $restart; then
    pg_ctlcluster --skip-systemctl-redirect "$major" main restart
    for _ in $(seq 1 60); do
        pg_isready -q -h "$PGHOST" -p "$PGPORT" && break
        sleep 0.5
    done
fi
if ! telemetry_off; then
    mkdir -p "$confdir"
    echo "timescaledb.telemetry_level = off" >"$telemetry_conf"
    psql_q "select pg_reload_conf()" >/dev/null
fi
echo "timescaledb: ready ($(psql_q "select default_version from pg_available_extensions where name = 'timescaledb'"), community edition)"
