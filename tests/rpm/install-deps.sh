#!/bin/sh
# Installs what rpm/build and tests/rpm/rpm-test.sh need on Debian: rpm
# (rpmbuild, rpm, rpm2cpio) and cpio. Usage (as root): tests/rpm/install-deps.sh
set -eu
if command -v rpmbuild >/dev/null && command -v rpm2cpio >/dev/null && command -v cpio >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends rpm rpm2cpio cpio
