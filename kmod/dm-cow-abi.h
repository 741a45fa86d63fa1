/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * dm-cow userspace ABI: the messages exchanged between the dm-cow target and
 * its allocation daemon over the per-ident channel /dev/dm-cow/<ident>.
 *
 * Shared by the kernel module and by userspace (C or C++); it needs nothing
 * but <linux/types.h>.  The full protocol (ordering rules, flush protocol,
 * failure policy, the table-reload rule) is described in docs/abi.md.
 *
 * Summary:
 *  - read(fd, buf, n * sizeof(struct dmcow_request)) returns a batch of 1..n
 *    requests (kernel -> daemon).  It blocks unless O_NONBLOCK is set (then
 *    -EAGAIN); poll() reports POLLIN while a request can be read.
 *  - write(fd, buf, n * sizeof(struct dmcow_reply)) takes a batch of replies
 *    (daemon -> kernel).  They are processed in order; the return value is the
 *    number of bytes of the messages that were applied.  If message k is
 *    rejected, write() returns k * sizeof(struct dmcow_reply) when k > 0 and
 *    the negative error of message k when k == 0.
 *  - The first request on a freshly opened channel is always HELLO; the first
 *    reply must be a HELLO reply carrying DMCOW_ABI_VERSION.
 *  - All reserved fields must be zero.  Numbers are host-endian.
 */
#ifndef _UAPI_LINUX_DM_COW_ABI_H
#define _UAPI_LINUX_DM_COW_ABI_H

#include <linux/types.h>

#define DMCOW_ABI_VERSION	1

/* The channel of ident <ident> is DMCOW_DEV_DIR "<ident>". */
#define DMCOW_DEV_DIR		"/dev/dm-cow/"
#define DMCOW_IDENT_MAX		32	/* [A-Za-z0-9_.-], 1..32 characters,
					 * not "." or ".." */

/* Largest extent of an RW (kernel-filled) mapping in one MAP or PUSH reply. */
#define DMCOW_MAX_FILL_EXTENT	64

/* ---- kernel -> daemon ---------------------------------------------------- */

enum dmcow_request_kind {
	DMCOW_REQ_HELLO		= 1,	/* first message after open() */
	DMCOW_REQ_MAP_WRITE	= 2,	/* a write hit a chunk without RW mapping */
	DMCOW_REQ_MAP_READ	= 3,	/* read_to_daemon: read of unmapped chunk */
	DMCOW_REQ_FLUSH		= 4,	/* make your metadata durable, then ack */
};

/* dmcow_request.flags */
#define DMCOW_REQ_F_FULL_CHUNK	(1U << 0)	/* MAP_WRITE: the first held
						 * write covers the whole chunk */

/* dmcow_request.features (HELLO) */
#define DMCOW_FEATURE_READ_TO_DAEMON	(1U << 0)

struct dmcow_request {
	__u64 seq;		/* unique, never 0; echo it in the reply */
	__u32 kind;		/* enum dmcow_request_kind */
	__u32 flags;		/* DMCOW_REQ_F_* */
	__u64 chunk;		/* MAP_*: chunk index (device sector / chunk_sectors) */
	__u64 nr_chunks;	/* HELLO: chunks in the device; MAP_*: 1 */
	__u64 cow_sectors;	/* HELLO: size of cow_dev in 512-byte sectors */
	__u32 version;		/* HELLO: DMCOW_ABI_VERSION of the kernel */
	__u32 chunk_sectors;	/* HELLO: chunk size in 512-byte sectors */
	__u32 features;		/* HELLO: DMCOW_FEATURE_* */
	__u32 max_requests;	/* HELLO: bound on outstanding MAP_* requests */
	__u64 reserved;
};

/* ---- daemon -> kernel ---------------------------------------------------- */

enum dmcow_reply_kind {
	DMCOW_REP_HELLO		= 1,	/* seq = HELLO seq, version */
	DMCOW_REP_MAP		= 2,	/* answer to MAP_WRITE / MAP_READ seq */
	DMCOW_REP_PUSH		= 3,	/* unsolicited mapping, seq = 0 */
	DMCOW_REP_INVALIDATE	= 4,	/* forget mappings, seq = 0 */
	DMCOW_REP_FLUSH_ACK	= 5,	/* answer to FLUSH seq */
	DMCOW_REP_ERROR		= 6,	/* fail request seq with errno `error` */
};

enum dmcow_map_kind {
	DMCOW_MAP_RW		= 1,	/* fresh location: kernel fills it with the
					 * chunk's current data, then reads and
					 * writes go there */
	DMCOW_MAP_RO		= 2,	/* reads from cow_sector, a write asks */
	DMCOW_MAP_ZERO		= 3,	/* reads return zeros, a write asks */
	DMCOW_MAP_FILLED_RW	= 4,	/* like RW, but the daemon already put the
					 * chunk's data there: no kernel copy */
	DMCOW_MAP_BASE		= 5,	/* reads from base_dev, a write asks */
};

struct dmcow_reply {
	__u64 seq;		/* request answered (0 for PUSH/INVALIDATE) */
	__u32 kind;		/* enum dmcow_reply_kind */
	__u32 map;		/* MAP/PUSH: enum dmcow_map_kind; else 0 */
	__u64 chunk;		/* MAP/PUSH/INVALIDATE: first chunk of extent */
	__u64 nr_chunks;	/* MAP/PUSH/INVALIDATE: extent length, >= 1 */
	__u64 cow_sector;	/* RW/RO/FILLED_RW: cow_dev sector of `chunk`;
				 * chunk + i lives at cow_sector + i * chunk_sectors */
	__u32 version;		/* HELLO: DMCOW_ABI_VERSION of the daemon */
	__u32 error;		/* ERROR: positive errno (e.g. ENOSPC, EIO) */
	__u64 reserved[2];
};

#if defined(__cplusplus)
static_assert(sizeof(struct dmcow_request) == 64, "dmcow_request ABI size");
static_assert(sizeof(struct dmcow_reply) == 64, "dmcow_reply ABI size");
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(struct dmcow_request) == 64, "dmcow_request ABI size");
_Static_assert(sizeof(struct dmcow_reply) == 64, "dmcow_reply ABI size");
#endif

#endif /* _UAPI_LINUX_DM_COW_ABI_H */
