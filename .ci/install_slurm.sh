#!/usr/bin/env bash
# Install what tests/slurm_cluster.py needs to start a real SLURM cluster on a
# Debian/Ubuntu CI machine: slurmctld/slurmd/slurm clients, munge, iproute2 (ip,
# bridges, network namespaces), util-linux (nsenter, unshare) and Open MPI.
# Idempotent and non-interactive; must run as root (or with sudo available).
# It only installs packages: no daemon is started and no config is written.
set -euo pipefail

PACKAGES=(slurm-wlm munge iproute2 util-linux openmpi-bin libopenmpi-dev)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_slurm.sh: needs root (or sudo)" >&2; exit 1
    fi
fi

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_slurm.sh: all packages already installed (${PACKAGES[*]})"
else
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}"
fi

# Sanity check: the binaries the test cluster uses.
for b in slurmctld slurmd slurmstepd sbatch srun scontrol squeue scancel sinfo \
         munged mungekey ip nsenter unshare; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1; then
        echo "install_slurm.sh: $b still missing after install" >&2; exit 1
    fi
done
echo "install_slurm.sh: $(PATH="$PATH:/usr/sbin" slurmctld -V), munge $(PATH="$PATH:/usr/sbin" munged -V 2>&1 | awk '{print $1}')"
