#!/usr/bin/env bash
# The Debian packages, as a Debian 12 host gets them:
#   tests/debian_package_test.sh OUTDIR
#  1. built from this tree by Debian's tooling (dpkg-buildpackage: debhelper,
#     dh-dkms; debian/): dmcow and dm-cow-dkms;
#  2. installed with dpkg -i into a clean root: an overlay of this system
#     (read-only below) with an empty tmpfs on top, chrooted into, so the
#     real dpkg, dkms, man and systemd-analyze run there and nothing lands on
#     this system;
#  3. checked there: the binaries run, every man page renders (man -l), the
#     unit passes systemd-analyze verify, the completion scripts parse
#     (bash -n), the nbdkit plugin loads, and DKMS (the package's postinst)
#     built and installed dm-cow for the installed Debian kernel's headers
#     (`dkms status`: installed);
#  4. removed (apt-get remove): every file of both packages and the module
#     DKMS installed are gone.
# OUTDIR gets the packages, the dmcow package's files unpacked under
# OUTDIR/root and the dm-cow.ko DKMS built: the VM suite then runs those
# binaries and loads that module (scripts/test.sh: DMCOW_INSTALLED,
# DMCOW_KO), so it tests what users install. Needs root (mount, chroot; sudo
# is used otherwise) and install-deps.sh's packages.
set -euo pipefail
die() { echo "debian_package_test: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: $0 OUTDIR"
SRC=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
KVER=${KVER:-$(ls /lib/modules | grep amd64 | sort -V | tail -1)}
[ -d "/lib/modules/$KVER/build" ] || die "no kernel headers for $KVER (linux-headers-amd64)"
VERSION=$(dpkg-parsechangelog -l "$SRC/debian/changelog" -S Version)

TMP=$(mktemp -d)
ROOT=$TMP/layers/root
cleanup() {
	$SUDO umount -R "$ROOT" 2>/dev/null || true
	$SUDO umount "$TMP/layers" 2>/dev/null || true
	$SUDO rm -rf "$TMP"
}
trap cleanup EXIT

echo "== building the packages (dpkg-buildpackage -b; log: $OUT/build.log)"
mkdir "$TMP/src"
git -C "$SRC" ls-files -co --exclude-standard | tar -C "$SRC" -T - -cf - | tar -C "$TMP/src" -xf -
(cd "$TMP/src" && dpkg-buildpackage -b -us -uc) >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; die "build failed"; }
rm -f "$OUT"/*.deb
cp "$TMP"/*.deb "$OUT/"
DEBS=("dmcow_${VERSION}_$(dpkg --print-architecture).deb" "dm-cow-dkms_${VERSION}_all.deb")
for d in "${DEBS[@]}"; do [ -f "$OUT/$d" ] || die "no $d built"; done
rm -rf "$OUT/root"
dpkg-deb -x "$OUT/${DEBS[0]}" "$OUT/root"

echo "== a clean root: this system below, an empty tmpfs above"
mkdir -p "$TMP/layers"
$SUDO mount -t tmpfs -o size=2g tmpfs "$TMP/layers"
$SUDO mkdir -p "$TMP/layers/upper" "$TMP/layers/work" "$ROOT"
$SUDO mount -t overlay overlay -o "lowerdir=/,upperdir=$TMP/layers/upper,workdir=$TMP/layers/work" "$ROOT"
$SUDO mount --rbind /dev "$ROOT/dev"
$SUDO mount -t proc proc "$ROOT/proc"
$SUDO mount -t sysfs sysfs "$ROOT/sys"
$SUDO mount -t tmpfs tmpfs "$ROOT/run"
$SUDO mount -t tmpfs tmpfs "$ROOT/tmp"
$SUDO mkdir -p "$ROOT/debs"
$SUDO cp "$OUT"/*.deb "$ROOT/debs/"
in_root() { $SUDO env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root chroot "$ROOT" "$@"; }
# Nothing of ours is there before (a host that installed dmcow by hand would
# make the checks below meaningless).
for f in /usr/sbin/dmcow-qcow /usr/bin/dmcow-img /usr/src/dm-cow-"$VERSION"; do
	[ ! -e "$ROOT$f" ] || die "$f exists before the install: not a clean root"
done

fail=0
check() {	# what, command...: runs it in the root
	local what=$1 out
	shift
	if out=$(in_root "$@" 2>&1); then
		echo "PASS  $what"
	else
		echo "FAIL  $what: $(echo "$out" | tail -5 | tr '\n' ' ')"
		fail=1
	fi
}

echo "== dpkg -i"
check "dpkg -i ${DEBS[*]}" dpkg -i "${DEBS[@]/#//debs/}"
check "dmcow-img --version" dmcow-img --version
check "dmcow-qcow --help" dmcow-qcow --help
check "dmcowd --help" dmcowd --help
for page in dmcow-img.1 dmcow-qcow.8 dmcowd.8 dm-cow.4 dmcowtab.5 nbdkit-dmcow-plugin.1; do
	check "man -l $page" sh -c "man -l /usr/share/man/man${page##*.}/$page.gz >/dev/null"
	check "man ${page%.*}" sh -c "man ${page##*.} ${page%.*} >/dev/null"
done
check "systemd-analyze verify dmcow-qcow@vm0.service" sh -c \
	'out=$(systemd-analyze verify dmcow-qcow@vm0.service 2>&1) && [ -z "$out" ] || { echo "$out"; exit 1; }'
check "bash -n completions" sh -c 'bash -n /usr/share/bash-completion/completions/dmcow-img &&
	bash -n /usr/share/bash-completion/completions/dmcow-qcow'
check "nbdkit loads the plugin" nbdkit --dump-plugin dmcow
echo "== DKMS: dpkg -i's postinst built and installed dm-cow for the Debian kernel ($KVER)"
check "dkms.conf installed" test -f "/usr/src/dm-cow-$VERSION/dkms.conf"
check "dkms status: installed for $KVER" sh -c \
	"dkms status -m dm-cow -v $VERSION -k $KVER | tee /dev/stderr | grep -q ': installed'"
check "modinfo of the installed module" modinfo -k "$KVER" dm-cow
KO=$ROOT/var/lib/dkms/dm-cow/$VERSION/$KVER/x86_64/module/dm-cow.ko
if [ -f "$KO" ]; then
	cp "$KO" "$OUT/dm-cow.ko"
	echo "DKMS-built module: $OUT/dm-cow.ko ($(modinfo -F vermagic "$OUT/dm-cow.ko"))"
else
	echo "FAIL  no module at ${KO#$ROOT}"
	fail=1
fi

echo "== apt-get remove"
check "apt-get remove dmcow dm-cow-dkms" apt-get remove -y -q dmcow dm-cow-dkms
for f in /usr/bin/dmcow-img /usr/sbin/dmcow-qcow /usr/sbin/dmcowd /usr/lib/systemd/system/dmcow-qcow@.service \
	/usr/share/man/man8/dmcow-qcow.8.gz /usr/share/bash-completion/completions/dmcow-qcow \
	"/usr/src/dm-cow-$VERSION" "/var/lib/dkms/dm-cow" "/lib/modules/$KVER/updates/dkms/dm-cow.ko"; do
	if [ -e "$ROOT$f" ]; then
		echo "FAIL  $f is left after apt-get remove"
		fail=1
	fi
done
[ $fail = 0 ] && echo "PASS  removed without a trace"
[ $fail = 0 ] && echo "debian_package_test: all passed" || echo "debian_package_test: FAILED"
exit $fail
