#!/usr/bin/env bash
# The man pages (man/*.scd) against the programs they describe:
#   tests/man_test.sh DMCOW_IMG DMCOW_QCOW DMCOWD
# Each page must render with scdoc, and every option a program's --help
# prints (dmcow-img: every command's --help, the commands taken from
# `dmcow-img --help`) must appear in its page's source. Exit 0 when all
# pass, 1 on any miss, 77 (skipped) when scdoc is not installed.
set -uo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 DMCOW_IMG DMCOW_QCOW DMCOWD" >&2
  exit 2
fi
dmcow_img=$1
dmcow_qcow=$2
dmcowd=$3
man_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/man"

if ! command -v scdoc >/dev/null 2>&1; then
  echo "man_test: scdoc not installed"
  exit 77
fi

failures=0
fail() {
  echo "FAIL $*"
  failures=$((failures + 1))
}

pages=(dmcow-img.1 dmcow-qcow.8 dmcowd.8 dm-cow.4 dmcowtab.5)
for page in "${pages[@]}"; do
  src="$man_dir/$page.scd"
  if [[ ! -f $src ]]; then
    fail "$page: $src is missing"
    continue
  fi
  if ! err=$(scdoc <"$src" 2>&1 >/dev/null); then
    fail "$page: scdoc cannot render it: $err"
  fi
done

# The options in a help text, one a line: -x and --long-name, each at the
# start of a line or after one of ][ (,| and a space; -h/--help/--version
# left out.
options_of() {
  grep -oE -- '(^|[][ (,|])--?[A-Za-z][A-Za-z0-9-]*' |
    sed -E 's/^[][ (,|]//' |
    grep -vxE -- '-h|--help|--version' |
    sort -u
}

# check_options PAGE WHAT HELP_TEXT
check_options() {
  local page=$1 what=$2 help=$3 src="$man_dir/$1.scd" opt n=0
  if [[ -z $help ]]; then
    fail "$page: $what printed no help"
    return
  fi
  [[ -f $src ]] || return  # reported above
  while IFS= read -r opt; do
    [[ -n $opt ]] || continue
    n=$((n + 1))
    grep -qF -- "$opt" "$src" || fail "$page: $what option $opt is not in the man page"
  done < <(options_of <<<"$help")
  if [[ $n -eq 0 ]]; then
    fail "$page: $what --help lists no options"
  fi
}

# dmcow-img: the top-level help, then each command's.
img_help=$("$dmcow_img" --help 2>&1)
check_options dmcow-img.1 "dmcow-img" "$img_help"
commands=$(awk '/^Commands:/ { in_list = 1; next }
                in_list && /^  [a-z]/ { print $1; next }
                in_list { in_list = 0 }' <<<"$img_help")
if [[ -z $commands ]]; then
  fail "dmcow-img.1: no commands found in dmcow-img --help"
fi
for cmd in $commands; do
  check_options dmcow-img.1 "$cmd" "$("$dmcow_img" "$cmd" --help 2>&1)"
done

check_options dmcow-qcow.8 "dmcow-qcow" "$("$dmcow_qcow" --help 2>&1)"
check_options dmcowd.8 "dmcowd" "$("$dmcowd" --help 2>&1)"

if [[ $failures -ne 0 ]]; then
  echo "man_test: $failures failure(s)"
  exit 1
fi
echo "man_test: all passed"
exit 0
