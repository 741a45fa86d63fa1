/* SPDX-License-Identifier: GPL-2.0 */
/*
 * dm-cow: a device-mapper target whose block allocation is decided by a
 * userspace daemon.  Internal definitions shared by the target
 * (dm-cow-target.c) and the daemon channel (dm-cow-channel.c).
 *
 * Objects:
 *
 *  struct dmcow_shared  One per ident.  Every cow target with that ident (in
 *                       one table or across table reloads) and the open
 *                       channel share it: the mapping store, the outstanding
 *                       requests, the kcopyd client and the misc device.
 *
 *  struct dmcow_pending Two roles in one object:
 *                        - a request to the daemon (req_state QUEUED: not yet
 *                          read, SENT: read, waiting for the reply), found by
 *                          seq in seq_hash;
 *                        - a lock on a chunk (lock_state WAIT: bios wait for
 *                          the daemon's decision, FILL: the chunk's new
 *                          location is being filled), found by chunk in
 *                          chunk_hash.  While a chunk is locked every bio for
 *                          it queues on ->bios, in arrival order.
 *                       A FLUSH request uses only the first role.  The object
 *                       is freed when both roles have ended.
 *
 * Locking: dmcow_shared.lock (irqsave) protects all state of a shared object
 * except the fields noted otherwise.  It is never taken in hard-irq context:
 * bio completions that need it go through done_bios/done_work.  No code
 * sleeps while holding it.  Reply processing is serialised by write_mutex,
 * which is the only context that starts fills.
 */
#ifndef DM_COW_H
#define DM_COW_H

#include <linux/device-mapper.h>
#include <linux/dm-kcopyd.h>
#include <linux/hashtable.h>
#include <linux/mempool.h>
#include <linux/miscdevice.h>
#include <linux/mutex.h>
#include <linux/refcount.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <linux/xarray.h>

#include "dm-cow-abi.h"

#define DM_MSG_PREFIX "cow"

#define DMCOW_HASH_BITS		8
#define DMCOW_READ_BATCH	64	/* requests returned by one read() */

/* Mapping kinds as stored in dmcow_shared.mappings (FILLED_RW is stored as RW). */
enum dmcow_mkind {
	DMCOW_MK_NONE = 0,
	DMCOW_MK_RW = DMCOW_MAP_RW,
	DMCOW_MK_RO = DMCOW_MAP_RO,
	DMCOW_MK_ZERO = DMCOW_MAP_ZERO,
	DMCOW_MK_BASE = DMCOW_MAP_BASE,
};

/*
 * Store entries the kernel may drop on its own (dmcow_kind_cached()) carry
 * this mark, so that a drop sweep finds them without walking pinned ones.
 */
#define DMCOW_XA_CACHED		XA_MARK_1

/* A mapping: kind + cow_dev sector, packed into one xarray value entry. */
struct dmcow_map {
	u32 kind;			/* enum dmcow_mkind */
	sector_t sector;		/* cow_dev sector (RW/RO), else 0 */
};

enum dmcow_daemon_state {
	DMCOW_DAEMON_NONE,		/* no channel open */
	DMCOW_DAEMON_HELLO,		/* open, HELLO not yet read */
	DMCOW_DAEMON_HELLO_SENT,	/* HELLO read, reply awaited */
	DMCOW_DAEMON_READY,		/* handshake complete */
};

enum dmcow_req_state {
	DMCOW_REQ_NONE,
	DMCOW_REQ_QUEUED,		/* on send_queue, not yet read */
	DMCOW_REQ_SENT,			/* read by the daemon, reply awaited */
};

enum dmcow_lock_state {
	DMCOW_LOCK_NONE,
	DMCOW_LOCK_WAIT,		/* bios wait for the daemon's answer */
	DMCOW_LOCK_FILL,		/* new location being filled */
};

struct dmcow_shared;

struct dmcow_pending {
	struct dmcow_shared *sh;
	struct hlist_node seq_node;	/* seq_hash, while req_state != NONE */
	struct hlist_node chunk_node;	/* chunk_hash, while lock_state != NONE */
	struct list_head queue_node;	/* send_queue, while QUEUED */
	struct list_head fill_node;	/* private list of fills to start */
	u64 seq;			/* request sequence number */
	u64 chunk;			/* locked / requested chunk */
	u32 kind;			/* DMCOW_REQ_* */
	u32 req_flags;			/* DMCOW_REQ_F_* */
	u8 req_state;			/* enum dmcow_req_state */
	u8 lock_state;			/* enum dmcow_lock_state */
	bool counted;			/* counts against max_requests */
	bool from_pool;			/* allocated from pending_pool */
	struct bio_list bios;		/* held bios, arrival order */
	struct dmcow_map fill_to;	/* FILL: mapping being installed */
	struct dmcow_map fill_from;	/* FILL: current data of the chunk */
	u64 flush_gen;			/* FLUSH: fill_gen covered by the cow flush */
};

struct dmcow_shared {
	struct list_head list;		/* dmcow_shared_list; global mutex */
	char ident[DMCOW_IDENT_MAX + 1];
	refcount_t refs;		/* targets + open channel; drops to 0
					 * only under the global mutex */
	unsigned int nr_targets;	/* global mutex */
	struct list_head targets;	/* struct dmcow_target; global mutex */

	/* Geometry: fixed for the lifetime of the object. */
	dev_t base_devt;
	dev_t cow_devt;
	u32 chunk_sectors;
	unsigned int chunk_shift;
	unsigned int features;		/* DMCOW_FEATURE_* */

	/* Set while at least one target holds the devices open. */
	struct block_device *base_bdev;
	struct block_device *cow_bdev;
	sector_t dev_sectors;		/* end of the highest attached target */

	spinlock_t lock;
	struct xarray mappings;		/* chunk -> packed struct dmcow_map */
	u64 nr_mapped;			/* entries in mappings */
	u64 nr_cached;			/* of which marked DMCOW_XA_CACHED */
	u64 drop_next;			/* chunk where the next drop sweep
					 * starts; write_mutex */
	DECLARE_HASHTABLE(seq_hash, DMCOW_HASH_BITS);
	DECLARE_HASHTABLE(chunk_hash, DMCOW_HASH_BITS);
	struct list_head send_queue;	/* QUEUED requests, FIFO */
	struct bio_list overflow;	/* bios waiting for a request slot */
	u64 next_seq;
	unsigned int nr_requests;	/* counted pendings */

	enum dmcow_daemon_state daemon;
	u64 hello_seq;

	unsigned int fills_in_flight;
	u64 fill_gen;			/* bumped when a fill starts */
	wait_queue_head_t fill_wait;

	struct bio_list flush_bios;	/* flushes/FUA writes awaiting a FLUSH */
	bool flush_stale;		/* a queued FLUSH needs a new cow flush */

	spinlock_t done_lock;		/* protects done_bios; irq-safe */
	struct bio_list done_bios;	/* completed hooked bios */

	struct workqueue_struct *wq;	/* done_work, overflow_work */
	struct workqueue_struct *flush_wq;	/* flush_work only: it waits for
						 * fills that done_work ends */
	struct work_struct done_work;
	struct work_struct flush_work;
	struct work_struct overflow_work;

	struct dm_kcopyd_client *kc;
	mempool_t pending_pool;
	wait_queue_head_t read_wait;
	struct mutex read_mutex;	/* serialises read(); guards read_buf */
	struct mutex write_mutex;	/* serialises reply processing */
	struct dmcow_request *read_buf;
	u64 read_seqs[DMCOW_READ_BATCH];	/* seqs in read_buf */

	struct miscdevice misc;
	char misc_name[DMCOW_IDENT_MAX + 8];
	char misc_nodename[DMCOW_IDENT_MAX + 8];

	/* Statistics for the status line. */
	u64 stat_requests;
	u64 stat_copies;
	u64 stat_zero_fills;
	u64 stat_copies_skipped;
	u64 stat_flushes;
	u64 stat_errors;
	u64 stat_dropped;		/* cached entries dropped to make room */
};

/* dm-cow-target.c */
extern unsigned int dmcow_max_requests;
extern unsigned int dmcow_cache_chunks;
bool dmcow_shared_get_channel(struct dmcow_shared *sh);
void dmcow_shared_put(struct dmcow_shared *sh);
void dmcow_daemon_gone(struct dmcow_shared *sh);
bool dmcow_flush_ready(struct dmcow_shared *sh, struct dmcow_pending *p);
int dmcow_apply(struct dmcow_shared *sh, const struct dmcow_reply *rep);
int dmcow_complete_request(struct dmcow_shared *sh, const struct dmcow_reply *rep);
struct dmcow_pending *dmcow_seq_lookup(struct dmcow_shared *sh, u64 seq);

static inline u64 dmcow_dev_chunks(struct dmcow_shared *sh)
{
	return (sh->dev_sectors + sh->chunk_sectors - 1) >> sh->chunk_shift;
}

/* dm-cow-channel.c */
extern const struct file_operations dmcow_channel_fops;

#endif /* DM_COW_H */
