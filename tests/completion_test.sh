#!/bin/bash
# The bash completions (completion/): they parse, and completing a few
# command lines offers what the binaries take: commands, each command's
# options (every option its --help names), formats, output kinds, and for
# dmcow-qcow detach the names attached now.
#   tests/completion_test.sh DMCOW_IMG DMCOW_QCOW
set -uo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
PATH=$(dirname "$1"):$(dirname "$2"):$PATH
fail=0
for f in "$SRC/completion/dmcow-img" "$SRC/completion/dmcow-qcow"; do
	bash -n "$f" || { echo "FAIL bash -n $f"; fail=1; }
done
source "$SRC/completion/dmcow-img"
source "$SRC/completion/dmcow-qcow"
# offers WORDS... :: EXPECTED...: completing the line WORDS offers each EXPECTED.
offers() {
	local words=() want
	while [ "$1" != "::" ]; do words+=("$1"); shift; done
	shift
	COMP_WORDS=("${words[@]}")
	COMP_CWORD=$((${#words[@]} - 1))
	COMPREPLY=()
	case ${words[0]} in
	dmcow-img) _dmcow_img ;;
	dmcow-qcow) _dmcow_qcow ;;
	esac
	for want in "$@"; do
		# grep reads it all (no -q): an early exit would make printf fail on a
		# closed pipe, and pipefail report the match as a miss.
		if ! printf '%s\n' "${COMPREPLY[@]}" | grep -xF -- "$want" >/dev/null; then
			echo "FAIL '${words[*]}' does not offer '$want' (offers: ${COMPREPLY[*]})"
			fail=1
		fi
	done
}
offers dmcow-img in :: info
offers dmcow-img "" :: info map create commit convert check compare checksum resize measure dd bench rebase amend \
	bitmap snapshot manifest
offers dmcow-img convert -O "" :: raw qcow qcow2
offers dmcow-img create -f q :: qcow qcow2
offers dmcow-img check --output "" :: human json
offers dmcow-img check -r "" :: leaks all
offers dmcow-img checksum -a "" :: blk-sha256 sha256
# Every long option a command's --help names is offered.
for cmd in info check convert manifest; do
	opts=$(dmcow-img "$cmd" --help 2>&1 | grep -oE -- '--[a-z][a-z-]+' | sort -u)
	[ -n "$opts" ] || { echo "FAIL dmcow-img $cmd --help names no option"; fail=1; }
	offers dmcow-img "$cmd" -- :: $opts
done
offers dmcow-qcow "" :: attach detach list mount umount
offers dmcow-qcow attach -- :: --name --read-only --no-backing --allow-device-backing --scratch-max --key-file \
	--no-partitions
offers dmcow-qcow mount -- :: --partition --read-only --name --key-file --no-partitions
offers dmcow-qcow umount /u :: /usr
offers dmcow-qcow attach -- :: --tab
offers dmcow-qcow list --output "" :: human json
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
touch "$state/vm1.json" "$state/web.json"
DMCOW_QCOW_STATE_DIR=$state offers dmcow-qcow detach "" :: vm1 web
DMCOW_QCOW_STATE_DIR=$state offers dmcow-qcow detach w :: web
printf '# NAME IMAGE\nvm0 /a.qcow2\n  data /b.qcow2 read-only\n' >"$state/tab"
DMCOWTAB=$state/tab offers dmcow-qcow attach --tab "" :: vm0 data
[ $fail = 0 ] && echo "completion_test: all passed"
exit $fail
