#!/usr/bin/env bash
# Installs the PostgreSQL server binaries the store tests need, without starting or even
# creating a cluster: each test session initdb's its own throwaway server (tests/pg.py).
# Safe to run again: does nothing when Debian's binaries are already present.
# Used by .ci/run before the tests, and by tests/pg.py when it finds no binaries.
set -euo pipefail

have_binaries() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }

if have_binaries; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "pg-setup: PostgreSQL binaries are missing and only root can install them" >&2
    exit 1
fi

# Debian's postinst would create the "main" cluster and start it. For the length of the
# install, a createcluster.d drop-in tells pg_createcluster not to create it, and a policy-rc.d
# that forbids every action (exit 101) keeps invoke-rc.d from starting anything. Both are
# removed afterwards; a policy-rc.d that was already there is left as it was.
dropin=/etc/postgresql-common/createcluster.d/zz-freemark-no-main-cluster.conf
cleanup=("$dropin")
mkdir -p "$(dirname "$dropin")"
echo "create_main_cluster = false" >"$dropin"
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    cleanup+=(/usr/sbin/policy-rc.d)
fi
trap 'rm -f "${cleanup[@]}"' EXIT

export DEBIAN_FRONTEND=noninteractive RUNLEVEL=1
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
if ! have_binaries; then
    echo "pg-setup: installed the postgresql package but found no initdb" >&2
    exit 1
fi
echo "pg-setup: PostgreSQL binaries in $(dirname "$(compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n 1)")"
