#!/usr/bin/env bash
# Install the launchers the multi-process tests start for real, when they are missing: Open MPI (mpirun),
# Slurm's controller, node daemon and client (srun), and for the multi-node tests (hosts as network namespaces)
# OpenSSH's server and client and pdsh (DeepSpeed's multi-node launcher). Debian/Ubuntu packages; needs root or
# sudo. Without them those tests skip and say why.
set -uo pipefail
need=()
command -v mpirun > /dev/null || need+=(openmpi-bin)
command -v srun > /dev/null || need+=(slurm-client)
[ -x /usr/sbin/slurmctld ] || need+=(slurmctld)
[ -x /usr/sbin/slurmd ] || need+=(slurmd)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh > /dev/null || need+=(openssh-client)
command -v pdsh > /dev/null || need+=(pdsh)
[ ${#need[@]} = 0 ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
echo "installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"; }; then
    echo "could not install ${need[*]}: the tests that start them will skip" >&2
fi
exit 0
