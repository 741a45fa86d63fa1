#!/bin/bash
# Images for the qcow2 and qcow (v1) attach tests in the VM (qcow_test.cc), made by the
# real qemu-img/qemu-io on the host, and a manifest: one line per image the
# VM reads, "<file> <sha256 of qemu-img convert -O raw>".
#   tests/vm/qcow_inputs.sh OUTDIR
set -euo pipefail
OUT=$1
rm -rf "$OUT"
mkdir -p "$OUT"
cd "$OUT"
q() { qemu-io "$@" >/dev/null; }

qemu-img create -q -f qcow2 empty.qcow2 8M
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 8M
q -f qcow2 -c 'write -P 0x21 0 3M' -c 'write -P 0x22 5M 17k' v2.qcow2
qemu-img create -q -f raw src.raw 8M
q -f raw -c 'write -P 0x33 0 2M' -c 'write -P 0x44 3M 1M' -c 'write -P 0x45 6M 300k' src.raw
qemu-img convert -c -O qcow2 src.raw zlib.qcow2
qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=4096 src.raw zstd.qcow2
rm src.raw
# raw <- qcow2 <- qcow2
qemu-img create -q -f raw chain-base.raw 8M
q -f raw -c 'write -P 0x51 0 8M' chain-base.raw
qemu-img create -q -f qcow2 -b chain-base.raw -F raw chain-mid.qcow2 8M
q -f qcow2 -c 'write -P 0x52 1M 1M' -c 'write -z 4M 512k' chain-mid.qcow2
qemu-img create -q -f qcow2 -b chain-mid.qcow2 -F qcow2 chain-top.qcow2 8M
q -f qcow2 -c 'write -P 0x53 1536k 1M' -c 'write -P 0x54 7M 3k' chain-top.qcow2
# extended L2 over a compressed qcow2 backing: partial clusters
qemu-img create -q -f qcow2 -b zlib.qcow2 -F qcow2 -o extended_l2=on,cluster_size=128k extl2.qcow2 8M
q -f qcow2 -c 'write -P 0x61 4k 4k' -c 'write -z 200k 8k' -c 'write -z 512k 256k' -c 'write -P 0x62 1M 300k' extl2.qcow2
# zero clusters, discards, an internal snapshot (shared clusters)
qemu-img create -q -f qcow2 snap.qcow2 8M
q -f qcow2 -c 'write -P 0x71 0 4M' -c 'write -z 1M 256k' snap.qcow2
qemu-img snapshot -c s1 snap.qcow2
q -f qcow2 -c 'write -P 0x72 2M 64k' -c 'discard 3M 128k' snap.qcow2
# 512-byte clusters (chunks of 4 KiB hold 8 of them)
qemu-img create -q -f qcow2 -o cluster_size=512 small.qcow2 4M
q -f qcow2 -c 'write -P 0x81 0 1M' -c 'write -P 0x82 1537 5000' -c 'write -z 64k 8k' small.qcow2
# legacy qcow v1 (qemu-img makes 4 KiB clusters, 512 B over a backing file): data, compressed, and a
# v1 image over a v1 backing file (attached as a chain of two devices)
qemu-img create -q -f qcow v1.qcow 8M
q -f qcow -c 'write -P 0x91 0 2M' -c 'write -P 0x92 3073k 7k' -c 'write -P 0x93 6M 300k' v1.qcow
# (qemu-img 7.2 'convert -c -O qcow' writes everything, then exits 1 without
# a message: checked by compare, as in fixtures/regenerate.sh)
qemu-img convert -c -O qcow zlib.qcow2 v1zlib.qcow || true
qemu-img compare -q zlib.qcow2 v1zlib.qcow
qemu-img create -q -f qcow -b v1.qcow -F qcow v1top.qcow 8M
q -f qcow -c 'write -P 0x94 4k 4k' -c 'write -P 0x95 1025k 3k' -c 'write -P 0x96 7M 64k' v1top.qcow
# a backing file the VM turns into a FIFO, a character device, a block device
# (qcow_odd_backing): 0xa1 in the image's first 64 KiB, the rest from odd-base
qemu-img create -q -f raw odd-base 4M
qemu-img create -q -f qcow2 -b odd-base -F raw odd.qcow2 4M
q -f qcow2 -c 'write -P 0xa1 0 64k' odd.qcow2
rm odd-base
# for mkfs
qemu-img create -q -f qcow2 fs.qcow2 64M
# 3,000 single 4 KiB clusters at seeded random places of 16 MiB (about
# 2,100 distinct), allocated in that order: about 2,100 runs, more than the
# first table takes (qcow_background_scan)
qemu-img create -q -f qcow2 -o cluster_size=4096 scattered.qcow2 16M
awk 'BEGIN { srand(7); for (i = 0; i < 3000; i++) printf "write -q -P %d %d 4k\n", i % 250 + 1, int(rand() * 4096) * 4096 }' |
	qemu-io -t unsafe -f qcow2 scattered.qcow2 >/dev/null
# 32 MiB compressed, every 64 KiB cluster its own pair of bytes: i % 251 + 1
# in its first 32 KiB, i / 251 + 1 in the second (the scratch budget test)
qemu-img create -q -f raw scratch-src.raw 32M
args=()
for i in $(seq 0 511); do
	args+=(-c "write -P $((i % 251 + 1)) $((i * 64))k 32k" -c "write -P $((i / 251 + 1)) $((i * 64 + 32))k 32k")
done
q -f raw "${args[@]}" scratch-src.raw
qemu-img convert -c -f raw -O qcow2 scratch-src.raw scratch.qcow2
rm scratch-src.raw
# Sparse 16 GiB top over a sparse 16 GiB qcow2 backing, 64 KiB clusters, a few
# clusters each (files of a few hundred KiB; the kernel store bound test).
# Not in the manifest: qcow_cache_bound checks what it reads itself.
qemu-img create -q -f qcow2 sparse-base.qcow2 16G
q -f qcow2 -c 'write -P 0xa1 0 64k' -c 'write -P 0xa3 6G 64k' -c 'write -P 0xa2 10G 64k' -c 'write -z 12G 1G' \
	sparse-base.qcow2
qemu-img create -q -f qcow2 -b sparse-base.qcow2 -F qcow2 sparse-top.qcow2 16G
q -f qcow2 -c 'write -P 0xb1 5G 64k' -c 'write -z 6G 64k' -c "write -P 0xb2 $((16 * 1024 * 1024 - 64))k 64k" \
	sparse-top.qcow2

# Partitioned disks (qcow_partitions), as a user's tools make them: sfdisk's
# tables, ext4 made by mke2fs with a file in each ("hello": "<image>
# partition <N>"; label <image>-p<N>). GPT with two partitions; MBR with a primary, an extended
# and two logical partitions; and an MBR whose second entry runs past the end
# of the disk (mapped without it).
part_uuid() {	# image, N: a fixed UUID for its N-th file system
	printf '%08x-0000-4000-8000-%012d\n' "$(cksum <<<"$1" | cut -d' ' -f1)" "$2"
}
parted_disk() {	# image, sfdisk script (@: the disk), ext4 partitions...
	local image=$1 script=$2 raw=/tmp/qcow-inputs-$$.disk n start size
	shift 2
	rm -f "$raw"
	truncate -s 64M "$raw"
	printf "${script//@/$raw}" | sfdisk -q "$raw"
	for n in "$@"; do
		read -r start size < <(sfdisk -d "$raw" | sed -n "s|^$raw$n : start= *\([0-9]*\), size= *\([0-9]*\).*|\1 \2|p")
		rm -rf /tmp/qcow-inputs-$$.d
		mkdir /tmp/qcow-inputs-$$.d
		printf '%s partition %s\n' "$image" "$n" >/tmp/qcow-inputs-$$.d/hello
		# label IMAGE-pN, UUID from the image's name and N (qcow_udev finds them by-label, by-uuid)
		mke2fs -q -F -t ext4 -d /tmp/qcow-inputs-$$.d -L "$image-p$n" -U "$(part_uuid "$image" "$n")" \
			-E offset=$((start * 512)) "$raw" $((size / 2))k
	done
	qemu-img convert -f raw -O qcow2 "$raw" "$image"
	rm -rf "$raw" /tmp/qcow-inputs-$$.d
}
parted_disk gpt.qcow2 'label: gpt\nsize=16MiB\nsize=20MiB\n' 1 2
parted_disk mbr.qcow2 'label: dos\n@1 : size=8MiB, type=83\n@2 : size=40MiB, type=5\n@5 : size=12MiB, type=83\n@6 : size=16MiB, type=83\n' 1 5 6
parted_disk mbr-bad.qcow2 'label: dos\n@1 : size=8MiB, type=83\n@2 : size=8MiB, type=83\n' 1
# a file system on the whole disk, no partition table (qcow_mount)
rm -rf /tmp/qcow-inputs-$$.d && mkdir /tmp/qcow-inputs-$$.d
printf 'wholefs.qcow2 whole disk\n' >/tmp/qcow-inputs-$$.d/hello
mke2fs -q -F -t ext4 -d /tmp/qcow-inputs-$$.d /tmp/qcow-inputs-$$.disk 16M
qemu-img convert -f raw -O qcow2 /tmp/qcow-inputs-$$.disk wholefs.qcow2
# ... under an empty overlay (qcow_udev: its by-uuid link names the top device, not the backing level)
qemu-img create -q -f qcow2 -b wholefs.qcow2 -F qcow2 wholefs-top.qcow2 16M
rm -rf /tmp/qcow-inputs-$$.d /tmp/qcow-inputs-$$.disk
# entry 2's start (bytes 0x1d6-0x1d9) gets 0x40 as its top byte: 512 GiB into a 64 MiB disk
qemu-io -f qcow2 -c 'write -P 0x40 0x1d9 1' mbr-bad.qcow2 >/dev/null

# LUKS images (qcow2_luks): qemu-img's default cipher (aes-256-xts-plain64),
# aes-128-cbc-essiv:sha256, aes-256-cbc-plain64 on qcow2 v2 with 4 KiB
# clusters and a snapshot, and a LUKS image over a LUKS backing file with
# another key and zero clusters (which the daemon fills around writes); a
# short PBKDF2 time (encrypt.iter-time) keeps this fast. Legacy AES, which
# attach refuses. Their manifest adds the key files: "<file> <sha256> <key>
# [<backing key>]".
printf 'correct horse battery' >key-a
printf 'staple\n' >key-b
printf 'wrong horse battery' >key-bad
sec() { echo "--object secret,id=s$1,file=$2"; }
lopts() { echo "driver=qcow2,file.filename=$1,encrypt.key-secret=s0${2:+,backing.encrypt.key-secret=s1}"; }
# qemu-img times its key derivation and sometimes gives up ("Unable to get
# accurate CPU usage"): tried up to 20 times (a loaded 2-core machine has
# failed five in a row; a failed try costs milliseconds).
luks() {	# file, size, key, extra -o options, [backing, backing key]
	local o="encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10${4:+,$4}"
	for _ in $(seq 20); do
		if [ -n "${5:-}" ]; then
			qemu-img create -q $(sec 0 "$3") $(sec 1 "$6") -f qcow2 -b "$5" -F qcow2 -o "$o" "$1" "$2" && return
		else
			qemu-img create -q $(sec 0 "$3") -f qcow2 -o "$o" "$1" "$2" && return
		fi
	done
	return 1
}
luks_io() {	# file, key, [backing key], qemu-io -c commands...
	local f=$1 k=$2 kb=$3
	shift 3
	qemu-io $(sec 0 "$k") ${kb:+$(sec 1 "$kb")} --image-opts "$(lopts "$f" "$kb")" "$@" >/dev/null
}
luks luks.qcow2 8M key-a ""
luks_io luks.qcow2 key-a "" -c 'write -P 0xc1 0 1M' -c 'write -P 0xc2 3M 70k' -c 'write -z 5M 128k' -c 'write -P 0xc3 7M 1k'
luks luks-essiv.qcow2 8M key-b "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256"
luks_io luks-essiv.qcow2 key-b "" -c 'write -P 0xc4 64k 2M' -c 'write -P 0xc5 6M 3k'
luks luks-plain.qcow2 8M key-a "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,compat=0.10,cluster_size=4096"
luks_io luks-plain.qcow2 key-a "" -c 'write -P 0xc6 0 512k' -c 'write -P 0xc7 2049k 9k'
# shared clusters (an internal snapshot): the daemon fills their copies, encrypted by the engine
qemu-img snapshot -c s1 $(sec 0 key-a) --image-opts "$(lopts luks-plain.qcow2)"
luks luks-top.qcow2 8M key-b "" luks.qcow2 key-a
luks_io luks-top.qcow2 key-b key-a -c 'write -P 0xc8 512k 1M' -c 'write -P 0xc9 7M 4k' -c 'write -z 3M 64k'
qemu-img create -q --object secret,id=s0,data=aeskey -f qcow2 -o encrypt.format=aes,encrypt.key-secret=s0 aes.qcow2 8M
for entry in "luks.qcow2 key-a" "luks-essiv.qcow2 key-b" "luks-plain.qcow2 key-a" "luks-top.qcow2 key-b key-a"; do
	set -- $entry
	qemu-img convert $(sec 0 "$2") ${3:+$(sec 1 "$3")} --image-opts "$(lopts "$1" "${3:-}")" -O raw /tmp/qcow-inputs-$$.raw
	echo "$1 $(sha256sum </tmp/qcow-inputs-$$.raw | cut -d' ' -f1) ${*:2}"
done >manifest-luks

for f in v2.qcow2 zlib.qcow2 zstd.qcow2 chain-top.qcow2 chain-mid.qcow2 extl2.qcow2 snap.qcow2 small.qcow2 empty.qcow2 \
	v1.qcow v1zlib.qcow v1top.qcow scratch.qcow2 scattered.qcow2; do
	qemu-img convert -O raw $f /tmp/qcow-inputs-$$.raw
	echo "$f $(sha256sum </tmp/qcow-inputs-$$.raw | cut -d' ' -f1)"
done >manifest
rm -f /tmp/qcow-inputs-$$.raw
