// SPDX-License-Identifier: GPL-2.0
/*
 * dm-cow: copy-on-write target whose allocation decisions are made by a
 * userspace daemon (see docs/abi.md for the protocol and dm-cow.h for the
 * objects and locking rules).
 *
 * I/O path:
 *  - A bio never crosses a chunk (max_io_len = chunk_sectors).
 *  - If the chunk is locked (a request or a fill is in progress) the bio
 *    queues behind the lock, in arrival order.
 *  - Otherwise the chunk's mapping decides: RW -> cow_dev; RO -> cow_dev for
 *    reads; ZERO -> zeros for reads; BASE or none -> base_dev for reads (none
 *    asks the daemon in read_to_daemon mode).  Anything else becomes a request
 *    to the daemon and locks the chunk.
 *  - An RW mapping from the daemon is a fresh location: the chunk's current
 *    data is copied there with kcopyd (or zeroed, or not copied at all when
 *    the first held bio overwrites the whole chunk) before the mapping is
 *    installed and the held bios are issued.
 *  - Flushes and FUA writes complete only after the daemon acknowledges a
 *    FLUSH request, which is sent after cow_dev has been flushed.
 */

#include "dm-cow.h"

#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/ctype.h>
#include <linux/log2.h>
#include <linux/module.h>
#include <linux/slab.h>

#define DMCOW_MAX_CHUNK_SECTORS	(1U << 16)	/* 32 MiB */
#define DMCOW_POOL_SIZE		16		/* reserved pending objects */
#define DMCOW_APPLY_SLICE	256		/* chunks per lock hold in apply */

unsigned int dmcow_max_requests = 256;
module_param_named(max_requests, dmcow_max_requests, uint, 0644);
MODULE_PARM_DESC(max_requests,
		 "Outstanding MAP requests per ident; further bios wait in order");

/*
 * The kernel's store keeps one entry per chunk.  RW mappings are the
 * daemon's to fold into linear segments and invalidate; answers it can give
 * again (dmcow_kind_cached()) would pile up whatever is read - a full read
 * of a large sparse device pins ~9 bytes per chunk - so at most this many of
 * them are kept, and older ones are dropped to make room for new ones.
 */
unsigned int dmcow_cache_chunks = 65536;
module_param_named(cache_chunks, dmcow_cache_chunks, uint, 0644);
MODULE_PARM_DESC(cache_chunks,
		 "Mappings per ident the daemon can be asked for again (BASE; ZERO with read_to_daemon) kept at most");

DECLARE_DM_KCOPYD_THROTTLE_WITH_MODULE_PARM(kcopyd_throttle,
	"A percentage of time allocated for copying chunks to cow_dev");

static DEFINE_MUTEX(dmcow_shared_mutex);	/* shared list, targets, last put */
static LIST_HEAD(dmcow_shared_list);
static struct kmem_cache *dmcow_pending_cache;

struct dmcow_target {
	struct list_head list;		/* on sh->targets */
	struct dm_target *ti;
	struct dmcow_shared *sh;
	struct dm_dev *base_dev;
	struct dm_dev *cow_dev;
	bool requeue;			/* noflush suspend: push back held bios;
					 * sh->lock */
};

/* Per-bio data. */
struct dmcow_bio {
	struct dmcow_shared *sh;
	struct dmcow_target *t;		/* target that mapped the bio */
	struct dmcow_pending *fill;	/* PB_FILL: the fill this write does */
	bio_end_io_t *saved_end_io;	/* PB_HOOKED: original completion */
	void *saved_private;
	unsigned int flags;
};

#define PB_HOOKED	(1U << 0)	/* bi_end_io is dmcow_hooked_endio */
#define PB_FILL		(1U << 1)	/* whole-chunk write that fills a chunk */
#define PB_FUA		(1U << 2)	/* FUA write: needs a FLUSH round trip */

static void dmcow_redispatch(struct dmcow_shared *sh, struct bio *bio);
static void dmcow_start_fill(struct dmcow_shared *sh, struct dmcow_pending *p);

static inline struct dmcow_bio *dmcow_pb(struct bio *bio)
{
	return dm_per_bio_data(bio, sizeof(struct dmcow_bio));
}

/*----------------------------------------------------------------
 * Mapping store
 *--------------------------------------------------------------*/

static inline void *dmcow_map_pack(const struct dmcow_map *m)
{
	return xa_mk_value(((unsigned long)m->sector << 3) | m->kind);
}

static struct dmcow_map dmcow_map_unpack(void *entry)
{
	struct dmcow_map m = { .kind = DMCOW_MK_NONE, .sector = 0 };

	if (xa_is_value(entry)) {
		unsigned long v = xa_to_value(entry);

		m.kind = v & 7;
		m.sector = v >> 3;
	}
	return m;
}

static struct dmcow_map dmcow_map_get(struct dmcow_shared *sh, u64 chunk)
{
	return dmcow_map_unpack(xa_load(&sh->mappings, chunk));
}

/*
 * Mappings the kernel may forget on its own, because without one the chunk
 * behaves the same or asks again: BASE (reads go to base_dev either way, and
 * a fill copies from there either way), and with read_to_daemon ZERO (reads
 * ask the daemon, who answers again; docs/abi.md makes the daemon answer RW,
 * whose fill would now copy from base_dev, only where base_dev holds the
 * chunk's data).  RW and RO mappings are the daemon's to invalidate.
 */
static bool dmcow_kind_cached(struct dmcow_shared *sh, u32 kind)
{
	return kind == DMCOW_MK_BASE ||
	       (kind == DMCOW_MK_ZERO &&
		(sh->features & DMCOW_FEATURE_READ_TO_DAEMON));
}

static u64 dmcow_cache_max(void)
{
	return max(READ_ONCE(dmcow_cache_chunks), 1U);
}

static inline bool dmcow_map_equal(const struct dmcow_map *a,
				   const struct dmcow_map *b)
{
	return a->kind == b->kind && a->sector == b->sector;
}

/*
 * NOTE: Must be called with sh->lock held.  A store must hit a slot reserved
 * with xa_reserve() beforehand, so it never allocates.  Returns 0 or -errno.
 */
static int dmcow_map_set(struct dmcow_shared *sh, u64 chunk,
			 const struct dmcow_map *m)
{
	void *old;

	lockdep_assert_held(&sh->lock);

	if (m->kind == DMCOW_MK_NONE) {
		old = xa_erase(&sh->mappings, chunk);	/* clears its marks */
		if (xa_is_value(old)) {
			sh->nr_mapped--;
			if (dmcow_kind_cached(sh, dmcow_map_unpack(old).kind))
				sh->nr_cached--;
		}
		return 0;
	}

	old = xa_store(&sh->mappings, chunk, dmcow_map_pack(m),
		       GFP_NOWAIT | __GFP_NOWARN);
	if (xa_is_err(old)) {
		DMERR_LIMIT("%s: cannot store mapping of chunk %llu",
			    sh->ident, chunk);
		return xa_err(old);
	}
	if (!xa_is_value(old))
		sh->nr_mapped++;
	else if (dmcow_kind_cached(sh, dmcow_map_unpack(old).kind))
		sh->nr_cached--;
	if (dmcow_kind_cached(sh, m->kind)) {
		xa_set_mark(&sh->mappings, chunk, DMCOW_XA_CACHED);
		sh->nr_cached++;
	} else {
		xa_clear_mark(&sh->mappings, chunk, DMCOW_XA_CACHED);
	}
	return 0;
}

/*----------------------------------------------------------------
 * Pending requests and chunk locks
 *--------------------------------------------------------------*/

static void dmcow_pending_init(struct dmcow_shared *sh,
			       struct dmcow_pending *p, bool from_pool)
{
	memset(p, 0, sizeof(*p));
	p->sh = sh;
	INIT_HLIST_NODE(&p->seq_node);
	INIT_HLIST_NODE(&p->chunk_node);
	INIT_LIST_HEAD(&p->queue_node);
	INIT_LIST_HEAD(&p->fill_node);
	bio_list_init(&p->bios);
	p->from_pool = from_pool;
}

static struct dmcow_pending *dmcow_chunk_lookup(struct dmcow_shared *sh,
						u64 chunk)
{
	struct dmcow_pending *p;

	hash_for_each_possible(sh->chunk_hash, p, chunk_node, chunk)
		if (p->chunk == chunk)
			return p;
	return NULL;
}

struct dmcow_pending *dmcow_seq_lookup(struct dmcow_shared *sh, u64 seq)
{
	struct dmcow_pending *p;

	hash_for_each_possible(sh->seq_hash, p, seq_node, seq)
		if (p->seq == seq)
			return p;
	return NULL;
}

static void dmcow_lock_chunk(struct dmcow_shared *sh, struct dmcow_pending *p,
			     u8 state)
{
	p->lock_state = state;
	hash_add(sh->chunk_hash, &p->chunk_node, p->chunk);
}

static void dmcow_unlock_chunk(struct dmcow_pending *p)
{
	hash_del(&p->chunk_node);
	p->lock_state = DMCOW_LOCK_NONE;
}

/* NOTE: Must be called with sh->lock held. */
static void dmcow_queue_request(struct dmcow_shared *sh,
				struct dmcow_pending *p)
{
	lockdep_assert_held(&sh->lock);

	p->seq = ++sh->next_seq;
	p->req_state = DMCOW_REQ_QUEUED;
	hash_add(sh->seq_hash, &p->seq_node, p->seq);
	list_add_tail(&p->queue_node, &sh->send_queue);
	wake_up(&sh->read_wait);
}

/* End the request role of @p (answered, superseded or aborted). */
static void dmcow_end_request(struct dmcow_pending *p)
{
	if (p->req_state == DMCOW_REQ_QUEUED)
		list_del_init(&p->queue_node);
	if (p->req_state != DMCOW_REQ_NONE)
		hash_del(&p->seq_node);
	p->req_state = DMCOW_REQ_NONE;
}

/* NOTE: Must be called with sh->lock held.  Frees @p once both roles ended. */
static void dmcow_pending_put_locked(struct dmcow_shared *sh,
				     struct dmcow_pending *p)
{
	lockdep_assert_held(&sh->lock);

	if (p->req_state != DMCOW_REQ_NONE || p->lock_state != DMCOW_LOCK_NONE)
		return;
	if (p->counted) {
		sh->nr_requests--;
		if (!bio_list_empty(&sh->overflow))
			queue_work(sh->wq, &sh->overflow_work);
	}
	if (p->from_pool)
		mempool_free(p, &sh->pending_pool);
	else
		kmem_cache_free(dmcow_pending_cache, p);
}

/*----------------------------------------------------------------
 * Bio helpers
 *--------------------------------------------------------------*/

static void dmcow_hooked_endio(struct bio *bio)
{
	struct dmcow_shared *sh = dmcow_pb(bio)->sh;
	unsigned long flags;

	spin_lock_irqsave(&sh->done_lock, flags);
	bio_list_add(&sh->done_bios, bio);
	spin_unlock_irqrestore(&sh->done_lock, flags);
	queue_work(sh->wq, &sh->done_work);
}

static void dmcow_hook(struct bio *bio, struct dmcow_bio *pb)
{
	if (pb->flags & PB_HOOKED)
		return;
	pb->saved_end_io = bio->bi_end_io;
	pb->saved_private = bio->bi_private;
	bio->bi_end_io = dmcow_hooked_endio;
	pb->flags |= PB_HOOKED;
}

/* Complete a bio we own, undoing the completion hook if there is one. */
static void dmcow_bio_finish(struct bio *bio, blk_status_t status)
{
	struct dmcow_bio *pb = dmcow_pb(bio);

	if (pb->flags & PB_HOOKED) {
		bio->bi_end_io = pb->saved_end_io;
		bio->bi_private = pb->saved_private;
	}
	pb->flags = 0;
	bio->bi_status = status;
	bio_endio(bio);
}

static void dmcow_fail_bios(struct bio_list *bios, blk_status_t status)
{
	struct bio *bio;

	while ((bio = bio_list_pop(bios)))
		dmcow_bio_finish(bio, status);
}

static sector_t dmcow_chunk_len(struct dmcow_shared *sh, u64 chunk)
{
	sector_t start = chunk << sh->chunk_shift;

	if (start < sh->dev_sectors && sh->dev_sectors - start < sh->chunk_sectors)
		return sh->dev_sectors - start;
	return sh->chunk_sectors;
}

static bool dmcow_bio_covers_chunk(struct dmcow_shared *sh, struct bio *bio)
{
	u64 chunk = bio->bi_iter.bi_sector >> sh->chunk_shift;

	return op_is_write(bio_op(bio)) &&
	       bio->bi_iter.bi_sector == chunk << sh->chunk_shift &&
	       bio_sectors(bio) == dmcow_chunk_len(sh, chunk);
}

static void dmcow_remap(struct bio *bio, struct block_device *bdev,
			sector_t sector)
{
	bio_set_dev(bio, bdev);
	bio->bi_iter.bi_sector = sector;
}

/*----------------------------------------------------------------
 * Dispatch
 *--------------------------------------------------------------*/

/*
 * Queue a MAP request for @bio and lock its chunk.
 * NOTE: Must be called with sh->lock held; never sleeps.
 */
static int dmcow_request_locked(struct dmcow_shared *sh, struct bio *bio,
				u64 chunk, bool write)
{
	struct dmcow_pending *p;

	lockdep_assert_held(&sh->lock);

	if (sh->daemon == DMCOW_DAEMON_NONE)
		return DM_MAPIO_KILL;

	if (!bio_list_empty(&sh->overflow) ||
	    sh->nr_requests >= max(dmcow_max_requests, 1U))
		goto overflow;

	p = mempool_alloc(&sh->pending_pool, GFP_NOWAIT | __GFP_NOWARN);
	if (!p)
		goto overflow;

	dmcow_pending_init(sh, p, true);
	p->kind = write ? DMCOW_REQ_MAP_WRITE : DMCOW_REQ_MAP_READ;
	p->chunk = chunk;
	if (dmcow_bio_covers_chunk(sh, bio))
		p->req_flags |= DMCOW_REQ_F_FULL_CHUNK;
	p->counted = true;
	sh->nr_requests++;
	sh->stat_requests++;
	bio_list_add(&p->bios, bio);
	dmcow_lock_chunk(sh, p, DMCOW_LOCK_WAIT);
	dmcow_queue_request(sh, p);
	return DM_MAPIO_SUBMITTED;

overflow:
	/* Back-pressure: wait, in order, for a request slot. */
	bio_list_add(&sh->overflow, bio);
	return DM_MAPIO_SUBMITTED;
}

/*
 * Route a data bio.  Never sleeps, so it serves both ->map and the paths
 * that release held bios.  Returns DM_MAPIO_REMAPPED (caller submits),
 * DM_MAPIO_SUBMITTED (held or completed) or DM_MAPIO_KILL.
 */
static int dmcow_dispatch(struct dmcow_shared *sh, struct bio *bio)
{
	struct dmcow_bio *pb = dmcow_pb(bio);
	sector_t sector = bio->bi_iter.bi_sector;
	sector_t offset = sector & (sh->chunk_sectors - 1);
	u64 chunk = sector >> sh->chunk_shift;
	bool write = op_is_write(bio_op(bio));
	struct dmcow_pending *p;
	struct dmcow_map m;
	unsigned long flags;
	int r;

	spin_lock_irqsave(&sh->lock, flags);

	p = dmcow_chunk_lookup(sh, chunk);
	if (p) {
		/* Fills finish on their own; requests may not (noflush suspend). */
		if (p->lock_state == DMCOW_LOCK_WAIT && pb->t->requeue) {
			spin_unlock_irqrestore(&sh->lock, flags);
			return DM_MAPIO_REQUEUE;
		}
		bio_list_add(&p->bios, bio);
		spin_unlock_irqrestore(&sh->lock, flags);
		return DM_MAPIO_SUBMITTED;
	}

	m = dmcow_map_get(sh, chunk);
	switch (m.kind) {
	case DMCOW_MK_RW:
		dmcow_remap(bio, sh->cow_bdev, m.sector + offset);
		goto remapped;
	case DMCOW_MK_RO:
		if (write)
			break;
		dmcow_remap(bio, sh->cow_bdev, m.sector + offset);
		goto remapped;
	case DMCOW_MK_ZERO:
		if (write)
			break;
		spin_unlock_irqrestore(&sh->lock, flags);
		zero_fill_bio(bio);
		bio_endio(bio);
		return DM_MAPIO_SUBMITTED;
	case DMCOW_MK_BASE:
		if (write)
			break;
		dmcow_remap(bio, sh->base_bdev, sector);
		goto remapped;
	default:
		if (write || (sh->features & DMCOW_FEATURE_READ_TO_DAEMON))
			break;
		dmcow_remap(bio, sh->base_bdev, sector);
		goto remapped;
	}

	if (pb->t->requeue)
		r = DM_MAPIO_REQUEUE;
	else
		r = dmcow_request_locked(sh, bio, chunk, write);
	spin_unlock_irqrestore(&sh->lock, flags);
	return r;

remapped:
	if (write && (bio->bi_opf & REQ_FUA)) {
		pb->flags |= PB_FUA;
		dmcow_hook(bio, pb);
	}
	spin_unlock_irqrestore(&sh->lock, flags);
	return DM_MAPIO_REMAPPED;
}

/*
 * Move the bios of targets in a noflush suspend from @from to @to.
 * NOTE: Must be called with sh->lock held.
 */
static void dmcow_take_requeued(struct dmcow_shared *sh, struct bio_list *from,
				struct bio_list *to)
{
	struct bio_list keep;
	struct bio *bio;

	lockdep_assert_held(&sh->lock);
	bio_list_init(&keep);
	while ((bio = bio_list_pop(from))) {
		if (dmcow_pb(bio)->t->requeue)
			bio_list_add(to, bio);
		else
			bio_list_add(&keep, bio);
	}
	*from = keep;
}

/* Route a bio outside ->map: submit it ourselves if it can go. */
static void dmcow_redispatch(struct dmcow_shared *sh, struct bio *bio)
{
	switch (dmcow_dispatch(sh, bio)) {
	case DM_MAPIO_REMAPPED:
		dm_submit_bio_remap(bio, NULL);
		break;
	case DM_MAPIO_KILL:
		dmcow_bio_finish(bio, BLK_STS_IOERR);
		break;
	case DM_MAPIO_REQUEUE:
		dmcow_bio_finish(bio, BLK_STS_DM_REQUEUE);
		break;
	default:
		break;
	}
}

static void dmcow_overflow_work(struct work_struct *work)
{
	struct dmcow_shared *sh = container_of(work, struct dmcow_shared,
					       overflow_work);
	struct bio_list bios;
	struct bio *bio;
	unsigned long flags;

	spin_lock_irqsave(&sh->lock, flags);
	bios = sh->overflow;
	bio_list_init(&sh->overflow);
	spin_unlock_irqrestore(&sh->lock, flags);

	while ((bio = bio_list_pop(&bios)))
		dmcow_redispatch(sh, bio);
}

/*----------------------------------------------------------------
 * Fills
 *--------------------------------------------------------------*/

/*
 * A fill ended: install its mapping and release the bios held on the chunk.
 * Process context (kcopyd callback or done_work).  Returns the fill's final
 * status: a mapping that cannot be stored fails it.
 */
static blk_status_t dmcow_fill_done(struct dmcow_shared *sh,
				    struct dmcow_pending *p,
				    blk_status_t status)
{
	struct bio_list bios;
	struct bio *bio;
	unsigned long flags;

	/* An apply that failed may have released the reserved slot. */
	if (!status && xa_reserve(&sh->mappings, p->chunk, GFP_NOIO))
		status = BLK_STS_RESOURCE;

	spin_lock_irqsave(&sh->lock, flags);
	if (!status && dmcow_map_set(sh, p->chunk, &p->fill_to))
		status = BLK_STS_RESOURCE;
	if (status)
		sh->stat_errors++;
	bios = p->bios;
	bio_list_init(&p->bios);
	dmcow_unlock_chunk(p);
	if (!--sh->fills_in_flight)
		wake_up_all(&sh->fill_wait);
	dmcow_pending_put_locked(sh, p);
	spin_unlock_irqrestore(&sh->lock, flags);

	if (status) {
		DMERR_LIMIT("%s: filling chunk failed", sh->ident);
		dmcow_fail_bios(&bios, BLK_STS_IOERR);
		return status;
	}
	while ((bio = bio_list_pop(&bios)))
		dmcow_redispatch(sh, bio);
	return BLK_STS_OK;
}

static void dmcow_fill_copied(int read_err, unsigned long write_err,
			      void *context)
{
	struct dmcow_pending *p = context;

	dmcow_fill_done(p->sh, p,
			(read_err || write_err) ? BLK_STS_IOERR : BLK_STS_OK);
}

/*
 * Fill the new location of a chunk locked in state FILL.  If the first held
 * bio overwrites the whole chunk it is the fill: no copy.
 */
static void dmcow_start_fill(struct dmcow_shared *sh, struct dmcow_pending *p)
{
	sector_t start = p->chunk << sh->chunk_shift;
	sector_t len = dmcow_chunk_len(sh, p->chunk);
	struct dm_io_region dst = {
		.bdev = sh->cow_bdev,
		.sector = p->fill_to.sector,
		.count = len,
	};
	struct dm_io_region src;
	struct bio *bio;
	unsigned long flags;

	spin_lock_irqsave(&sh->lock, flags);
	bio = bio_list_peek(&p->bios);
	if (bio && dmcow_bio_covers_chunk(sh, bio)) {
		bio_list_pop(&p->bios);
		sh->stat_copies_skipped++;
	} else {
		bio = NULL;
		if (p->fill_from.kind == DMCOW_MK_ZERO)
			sh->stat_zero_fills++;
		else
			sh->stat_copies++;
	}
	spin_unlock_irqrestore(&sh->lock, flags);

	if (bio) {
		struct dmcow_bio *pb = dmcow_pb(bio);

		pb->fill = p;
		pb->flags |= PB_FILL;
		if (bio->bi_opf & REQ_FUA)
			pb->flags |= PB_FUA;
		dmcow_hook(bio, pb);
		dmcow_remap(bio, sh->cow_bdev, dst.sector);
		dm_submit_bio_remap(bio, NULL);
		return;
	}

	if (p->fill_from.kind == DMCOW_MK_ZERO) {
		dm_kcopyd_zero(sh->kc, 1, &dst, 0, dmcow_fill_copied, p);
		return;
	}

	if (p->fill_from.kind == DMCOW_MK_RW || p->fill_from.kind == DMCOW_MK_RO) {
		src.bdev = sh->cow_bdev;
		src.sector = p->fill_from.sector;
	} else {
		src.bdev = sh->base_bdev;
		src.sector = start;
	}
	src.count = len;
	dm_kcopyd_copy(sh->kc, &src, 1, &dst, 0, dmcow_fill_copied, p);
}

/*----------------------------------------------------------------
 * Flush
 *--------------------------------------------------------------*/

static void dmcow_queue_flush(struct dmcow_shared *sh, struct bio *bio)
{
	unsigned long flags;

	spin_lock_irqsave(&sh->lock, flags);
	if (sh->daemon == DMCOW_DAEMON_NONE || dmcow_pb(bio)->t->requeue) {
		bool requeue = dmcow_pb(bio)->t->requeue;

		spin_unlock_irqrestore(&sh->lock, flags);
		dmcow_bio_finish(bio, requeue ? BLK_STS_DM_REQUEUE : BLK_STS_IOERR);
		return;
	}
	bio_list_add(&sh->flush_bios, bio);
	spin_unlock_irqrestore(&sh->lock, flags);
	queue_work(sh->flush_wq, &sh->flush_work);
}

/*
 * A FLUSH request may be read only when every fill started before that
 * moment has completed and been flushed to cow_dev: then all RW replies the
 * daemon wrote before reading the FLUSH are durable.
 * NOTE: Must be called with sh->lock held.
 */
bool dmcow_flush_ready(struct dmcow_shared *sh, struct dmcow_pending *p)
{
	lockdep_assert_held(&sh->lock);

	return !sh->fills_in_flight && p->flush_gen == sh->fill_gen;
}

static bool dmcow_fills_idle(struct dmcow_shared *sh)
{
	return !READ_ONCE(sh->fills_in_flight);
}

static void dmcow_flush_work(struct work_struct *work)
{
	struct dmcow_shared *sh = container_of(work, struct dmcow_shared,
					       flush_work);
	struct dmcow_pending *p = NULL, *q, *tmp;
	struct block_device *cow;
	struct bio_list batch, fail, requeue;
	unsigned long flags;
	bool stale;
	u64 gen;
	int r;

	spin_lock_irqsave(&sh->lock, flags);
	batch = sh->flush_bios;
	bio_list_init(&sh->flush_bios);
	stale = sh->flush_stale;
	sh->flush_stale = false;
	spin_unlock_irqrestore(&sh->lock, flags);

	if (bio_list_empty(&batch) && !stale)
		return;

	if (!bio_list_empty(&batch)) {
		p = kmem_cache_alloc(dmcow_pending_cache, GFP_NOIO);
		if (!p) {
			dmcow_fail_bios(&batch, BLK_STS_RESOURCE);
			return;
		}
		dmcow_pending_init(sh, p, false);
		p->kind = DMCOW_REQ_FLUSH;
		p->bios = batch;
	}

	/* Wait for the fills started so far, then flush their data. */
	for (;;) {
		wait_event(sh->fill_wait, dmcow_fills_idle(sh));
		spin_lock_irqsave(&sh->lock, flags);
		if (!sh->fills_in_flight) {
			gen = sh->fill_gen;
			cow = sh->cow_bdev;
			spin_unlock_irqrestore(&sh->lock, flags);
			break;
		}
		spin_unlock_irqrestore(&sh->lock, flags);
	}
	r = cow ? blkdev_issue_flush(cow) : -ENODEV;

	bio_list_init(&fail);
	bio_list_init(&requeue);
	spin_lock_irqsave(&sh->lock, flags);
	if (p)
		dmcow_take_requeued(sh, &p->bios, &requeue);
	if (p && bio_list_empty(&p->bios)) {
		kmem_cache_free(dmcow_pending_cache, p);
		p = NULL;
	}
	if (r || sh->daemon == DMCOW_DAEMON_NONE) {
		/* Fail this batch and every FLUSH not yet read. */
		list_for_each_entry_safe(q, tmp, &sh->send_queue, queue_node) {
			if (q->kind != DMCOW_REQ_FLUSH)
				continue;
			bio_list_merge(&fail, &q->bios);
			bio_list_init(&q->bios);
			dmcow_end_request(q);
			dmcow_pending_put_locked(sh, q);
		}
		if (p) {
			bio_list_merge(&fail, &p->bios);
			kmem_cache_free(dmcow_pending_cache, p);
		}
	} else {
		list_for_each_entry(q, &sh->send_queue, queue_node)
			if (q->kind == DMCOW_REQ_FLUSH)
				q->flush_gen = gen;
		if (p) {
			p->flush_gen = gen;
			dmcow_queue_request(sh, p);
		}
		wake_up(&sh->read_wait);
	}
	spin_unlock_irqrestore(&sh->lock, flags);

	if (r)
		DMERR_LIMIT("%s: flushing cow device failed: %d", sh->ident, r);
	dmcow_fail_bios(&fail, BLK_STS_IOERR);
	dmcow_fail_bios(&requeue, BLK_STS_DM_REQUEUE);
}

/* Completions of hooked bios (whole-chunk fills and FUA writes). */
static void dmcow_done_work(struct work_struct *work)
{
	struct dmcow_shared *sh = container_of(work, struct dmcow_shared,
					       done_work);
	struct bio_list bios;
	struct bio *bio;
	unsigned long flags;

	spin_lock_irqsave(&sh->done_lock, flags);
	bios = sh->done_bios;
	bio_list_init(&sh->done_bios);
	spin_unlock_irqrestore(&sh->done_lock, flags);

	while ((bio = bio_list_pop(&bios))) {
		struct dmcow_bio *pb = dmcow_pb(bio);
		blk_status_t status = bio->bi_status;

		if (pb->flags & PB_FILL) {
			pb->flags &= ~PB_FILL;
			status = dmcow_fill_done(sh, pb->fill, status);
		}
		if ((pb->flags & PB_FUA) && !status) {
			dmcow_queue_flush(sh, bio);
			continue;
		}
		dmcow_bio_finish(bio, status);
	}
}

/*----------------------------------------------------------------
 * Replies from the daemon (called by the channel, write_mutex held)
 *--------------------------------------------------------------*/

/*
 * Apply one mapping change to one chunk.
 * NOTE: Must be called with sh->lock held.
 */
static void dmcow_apply_chunk(struct dmcow_shared *sh, u64 chunk,
			      const struct dmcow_map *to, bool fill,
			      struct list_head *prealloc,
			      struct list_head *fills,
			      struct bio_list *release)
{
	struct dmcow_pending *p = dmcow_chunk_lookup(sh, chunk);
	struct dmcow_map cur = dmcow_map_get(sh, chunk);

	lockdep_assert_held(&sh->lock);

	/* A fill to the same place is in progress: nothing to do. */
	if (p && p->lock_state == DMCOW_LOCK_FILL)
		return;

	/* No fill if the data is already there (same mapping, RO made RW). */
	if (!fill || dmcow_map_equal(&cur, to) ||
	    (cur.kind == DMCOW_MK_RO && cur.sector == to->sector)) {
		dmcow_map_set(sh, chunk, to);
		if (p) {
			/* Held bios are re-evaluated against the new mapping. */
			bio_list_merge(release, &p->bios);
			bio_list_init(&p->bios);
			dmcow_unlock_chunk(p);
			if (p->req_state == DMCOW_REQ_QUEUED)
				dmcow_end_request(p);
			dmcow_pending_put_locked(sh, p);
		}
		return;
	}

	if (!p) {
		p = list_first_entry(prealloc, struct dmcow_pending, fill_node);
		list_del(&p->fill_node);
		dmcow_pending_init(sh, p, false);
		p->chunk = chunk;
		dmcow_lock_chunk(sh, p, DMCOW_LOCK_FILL);
	} else {
		p->lock_state = DMCOW_LOCK_FILL;
		/* A request the daemon has not read yet is answered by this. */
		if (p->req_state == DMCOW_REQ_QUEUED)
			dmcow_end_request(p);
	}
	p->fill_to = *to;
	p->fill_from = cur;
	sh->fills_in_flight++;
	sh->fill_gen++;
	list_add_tail(&p->fill_node, fills);
}

/* The mapping of chunk i of an extent whose first chunk maps to @first. */
static struct dmcow_map dmcow_extent_map(struct dmcow_shared *sh,
					 const struct dmcow_map *first, u64 i)
{
	struct dmcow_map m = *first;

	if (m.kind == DMCOW_MK_RW || m.kind == DMCOW_MK_RO)
		m.sector += i << sh->chunk_shift;
	return m;
}

/*
 * Drop up to @want cached mappings (dmcow_kind_cached()), going round the
 * chunk space from where the last sweep stopped: a clock hand, so no age is
 * kept per entry, and a reader going through the device in order loses its
 * oldest mappings first.  Chunks that are locked keep theirs: a request or a
 * fill in progress decided on it.  Each cached entry is visited at most
 * once, DMCOW_APPLY_SLICE per lock hold.  Only reply processing (this
 * context) adds cached entries, so none appear meanwhile.
 */
static void dmcow_cache_drop(struct dmcow_shared *sh, u64 want)
{
	static const struct dmcow_map none = { .kind = DMCOW_MK_NONE };
	unsigned long index, flags;
	u64 visits, dropped = 0;
	unsigned int slice;
	bool wrapped = false;

	lockdep_assert_held(&sh->write_mutex);

	spin_lock_irqsave(&sh->lock, flags);
	visits = sh->nr_cached;
	index = sh->drop_next;
	for (slice = 1; visits && dropped < want; slice++) {
		if (!xa_find(&sh->mappings, &index, ULONG_MAX,
			     DMCOW_XA_CACHED)) {
			if (wrapped)
				break;
			wrapped = true;
			index = 0;
			continue;
		}
		visits--;
		if (!dmcow_chunk_lookup(sh, index)) {
			dmcow_map_set(sh, index, &none);
			dropped++;
		}
		index++;
		if (!(slice % DMCOW_APPLY_SLICE)) {
			spin_unlock_irqrestore(&sh->lock, flags);
			cond_resched();
			spin_lock_irqsave(&sh->lock, flags);
		}
	}
	sh->drop_next = index;
	sh->stat_dropped += dropped;
	spin_unlock_irqrestore(&sh->lock, flags);
}

/*
 * Room for a cached mapping of @*n chunks from @*first: drop older cached
 * mappings so that at most cache_chunks remain with it.  A PUSH larger than
 * the cache is refused.  A MAP reply is cut, if it must be, to the part from
 * the requested chunk on (beyond that chunk the extent is an offer); it
 * always maps that chunk, so the held bios go on.  Chunks that are locked
 * keep their cached mappings: the cache exceeds its bound by at most those.
 */
static int dmcow_cache_room(struct dmcow_shared *sh,
			    const struct dmcow_reply *rep, u64 *first, u64 *n)
{
	u64 max = dmcow_cache_max(), want = rep->chunk, cached, room;
	struct dmcow_pending *req;
	unsigned long flags;

	lockdep_assert_held(&sh->write_mutex);

	if (rep->kind == DMCOW_REP_PUSH && *n > max) {
		DMERR_LIMIT("%s: push of %llu chunks from chunk %llu exceeds cache_chunks (%llu)",
			    sh->ident, *n, *first, max);
		return -E2BIG;
	}

	spin_lock_irqsave(&sh->lock, flags);
	cached = sh->nr_cached;
	if (rep->kind == DMCOW_REP_MAP) {
		req = dmcow_seq_lookup(sh, rep->seq);
		if (req && req->kind != DMCOW_REQ_FLUSH)
			want = req->chunk;
	}
	spin_unlock_irqrestore(&sh->lock, flags);

	if (cached + *n > max)
		dmcow_cache_drop(sh, cached + *n - max);
	if (rep->kind != DMCOW_REP_MAP || want < rep->chunk ||
	    want - rep->chunk >= rep->nr_chunks)
		return 0;	/* a bad MAP is refused by dmcow_apply() */

	spin_lock_irqsave(&sh->lock, flags);
	cached = sh->nr_cached;
	spin_unlock_irqrestore(&sh->lock, flags);
	room = cached < max ? max - cached : 0;
	if (*n > room) {
		*first = want;
		*n = min(max_t(u64, room, 1),
			 rep->chunk + rep->nr_chunks - want);
	}
	return 0;
}

/* MAP, PUSH or INVALIDATE; the extent was validated by the channel. */
int dmcow_apply(struct dmcow_shared *sh, const struct dmcow_reply *rep)
{
	bool invalidate = rep->kind == DMCOW_REP_INVALIDATE;
	bool fill = rep->map == DMCOW_MAP_RW;
	struct dmcow_map to = { .kind = DMCOW_MK_NONE, .sector = 0 };
	struct dmcow_pending *p, *tmp, *req = NULL;
	struct bio_list release;
	LIST_HEAD(prealloc);
	LIST_HEAD(fills);
	unsigned long flags;
	u64 i, end, first = rep->chunk, n = rep->nr_chunks;
	struct bio *bio;
	int r = 0;

	if (!invalidate) {
		to.kind = rep->map == DMCOW_MAP_FILLED_RW ? DMCOW_MK_RW : rep->map;
		if (to.kind == DMCOW_MK_RW || to.kind == DMCOW_MK_RO)
			to.sector = rep->cow_sector;
	}
	if (!invalidate && dmcow_kind_cached(sh, to.kind)) {
		r = dmcow_cache_room(sh, rep, &first, &n);
		if (r)
			return r;
		if (first != rep->chunk)
			to = dmcow_extent_map(sh, &to, first - rep->chunk);
	}

	/* Allocate everything applying may need while we may still sleep. */
	for (i = 0; fill && i < n; i++) {
		p = kmem_cache_alloc(dmcow_pending_cache, GFP_NOIO);
		if (!p) {
			r = -ENOMEM;
			goto out;
		}
		list_add(&p->fill_node, &prealloc);
	}
	for (i = 0; !invalidate && i < n; i++) {
		r = xa_reserve(&sh->mappings, first + i, GFP_NOIO);
		if (r)
			goto out;
		if (!(i % DMCOW_APPLY_SLICE))
			cond_resched();
	}

	/*
	 * Check the whole message before changing anything.  Only this
	 * (write_mutex) context starts fills, so a chunk that is not being
	 * filled now will not be when the apply pass reaches it.
	 */
	for (i = 0; i < n && !r; i = end) {
		end = min(n, i + DMCOW_APPLY_SLICE);
		spin_lock_irqsave(&sh->lock, flags);
		if (!i && rep->kind == DMCOW_REP_MAP) {
			req = dmcow_seq_lookup(sh, rep->seq);
			if (!req || req->req_state != DMCOW_REQ_SENT ||
			    req->kind == DMCOW_REQ_FLUSH ||
			    req->chunk < first || req->chunk - first >= n)
				r = -EINVAL;
			else if (req->kind == DMCOW_REQ_MAP_WRITE &&
				 to.kind != DMCOW_MK_RW)
				r = -EINVAL;
		}
		for (; i < end && !r; i++) {
			struct dmcow_map m = dmcow_extent_map(sh, &to, i);

			p = dmcow_chunk_lookup(sh, first + i);
			if (p && p->lock_state == DMCOW_LOCK_FILL &&
			    !dmcow_map_equal(&p->fill_to, &m))
				r = -EBUSY;
		}
		spin_unlock_irqrestore(&sh->lock, flags);
	}
	if (r)
		goto out;

	bio_list_init(&release);
	for (i = 0; i < n; i = end) {
		end = min(n, i + DMCOW_APPLY_SLICE);
		spin_lock_irqsave(&sh->lock, flags);
		if (req) {
			dmcow_end_request(req);
			dmcow_pending_put_locked(sh, req);
			req = NULL;
		}
		for (; i < end; i++) {
			struct dmcow_map m = dmcow_extent_map(sh, &to, i);

			dmcow_apply_chunk(sh, first + i, &m, fill,
					  &prealloc, &fills, &release);
		}
		spin_unlock_irqrestore(&sh->lock, flags);
		cond_resched();
	}

	list_for_each_entry_safe(p, tmp, &fills, fill_node) {
		list_del_init(&p->fill_node);
		dmcow_start_fill(sh, p);
	}
	while ((bio = bio_list_pop(&release)))
		dmcow_redispatch(sh, bio);

out:
	if (r && !invalidate)
		for (i = 0; i < n; i++)
			xa_release(&sh->mappings, first + i);
	list_for_each_entry_safe(p, tmp, &prealloc, fill_node)
		kmem_cache_free(dmcow_pending_cache, p);
	return r;
}

/* FLUSH_ACK or ERROR for request rep->seq. */
int dmcow_complete_request(struct dmcow_shared *sh,
			   const struct dmcow_reply *rep)
{
	blk_status_t status = BLK_STS_OK;
	struct dmcow_pending *p;
	struct bio_list bios, retry;
	struct bio *first = NULL, *bio;
	unsigned long flags;

	bio_list_init(&bios);
	bio_list_init(&retry);

	spin_lock_irqsave(&sh->lock, flags);
	p = dmcow_seq_lookup(sh, rep->seq);
	if (!p || p->req_state != DMCOW_REQ_SENT ||
	    (rep->kind == DMCOW_REP_FLUSH_ACK && p->kind != DMCOW_REQ_FLUSH)) {
		spin_unlock_irqrestore(&sh->lock, flags);
		return -EINVAL;
	}

	if (rep->kind == DMCOW_REP_ERROR) {
		status = errno_to_blk_status(-(int)rep->error);
		sh->stat_errors++;
	} else {
		sh->stat_flushes++;
	}

	if (p->kind == DMCOW_REQ_FLUSH) {
		bios = p->bios;
		bio_list_init(&p->bios);
	} else if (p->lock_state == DMCOW_LOCK_WAIT) {
		/*
		 * The bio that caused the request fails; those held behind
		 * it are re-evaluated (and may ask again).
		 */
		first = bio_list_pop(&p->bios);
		retry = p->bios;
		bio_list_init(&p->bios);
		dmcow_unlock_chunk(p);
	}
	dmcow_end_request(p);
	dmcow_pending_put_locked(sh, p);
	spin_unlock_irqrestore(&sh->lock, flags);

	dmcow_fail_bios(&bios, status);
	if (first)
		dmcow_bio_finish(first, status);
	while ((bio = bio_list_pop(&retry)))
		dmcow_redispatch(sh, bio);
	return 0;
}

/*
 * The channel was released: fail what waits for this daemon.  Held I/O fails
 * with EIO; until a daemon attaches again, I/O that needs one fails at once.
 * Fills in progress complete normally.
 */
void dmcow_daemon_gone(struct dmcow_shared *sh)
{
	struct dmcow_pending *p;
	struct hlist_node *tmp;
	struct bio_list fail, retry;
	unsigned long flags;
	struct bio *bio;
	int bkt;

	bio_list_init(&fail);

	spin_lock_irqsave(&sh->lock, flags);
	sh->daemon = DMCOW_DAEMON_NONE;
	hash_for_each_safe(sh->seq_hash, bkt, tmp, p, seq_node) {
		if (p->kind == DMCOW_REQ_FLUSH || p->lock_state == DMCOW_LOCK_WAIT) {
			bio_list_merge(&fail, &p->bios);
			bio_list_init(&p->bios);
		}
		if (p->lock_state == DMCOW_LOCK_WAIT)
			dmcow_unlock_chunk(p);
		dmcow_end_request(p);
		dmcow_pending_put_locked(sh, p);
	}
	bio_list_merge(&fail, &sh->flush_bios);
	bio_list_init(&sh->flush_bios);
	retry = sh->overflow;
	bio_list_init(&sh->overflow);
	spin_unlock_irqrestore(&sh->lock, flags);

	dmcow_fail_bios(&fail, BLK_STS_IOERR);
	while ((bio = bio_list_pop(&retry)))
		dmcow_redispatch(sh, bio);
}

/*----------------------------------------------------------------
 * Shared objects
 *--------------------------------------------------------------*/

static bool dmcow_ident_valid(const char *ident)
{
	size_t i, len = strlen(ident);

	/* It is a path component of the channel's device node. */
	if (!len || len > DMCOW_IDENT_MAX || !strcmp(ident, ".") ||
	    !strcmp(ident, ".."))
		return false;
	for (i = 0; i < len; i++)
		if (!isalnum(ident[i]) && !strchr("_.-", ident[i]))
			return false;
	return true;
}

static struct dmcow_shared *dmcow_shared_find(const char *ident)
{
	struct dmcow_shared *sh;

	list_for_each_entry(sh, &dmcow_shared_list, list)
		if (!strcmp(sh->ident, ident))
			return sh;
	return NULL;
}

static void dmcow_shared_free(struct dmcow_shared *sh)
{
	if (sh->misc.this_device)
		misc_deregister(&sh->misc);
	if (sh->kc)
		dm_kcopyd_client_destroy(sh->kc);
	if (sh->flush_wq)
		destroy_workqueue(sh->flush_wq);
	if (sh->wq)
		destroy_workqueue(sh->wq);
	mempool_exit(&sh->pending_pool);
	xa_destroy(&sh->mappings);
	kfree(sh->read_buf);
	kfree(sh);
}

static struct dmcow_shared *dmcow_shared_create(const char *ident,
						char **error)
{
	struct dmcow_shared *sh;
	int r;

	sh = kzalloc(sizeof(*sh), GFP_KERNEL);
	if (!sh) {
		*error = "Cannot allocate shared state";
		return ERR_PTR(-ENOMEM);
	}
	strscpy(sh->ident, ident, sizeof(sh->ident));
	INIT_LIST_HEAD(&sh->targets);
	spin_lock_init(&sh->lock);
	xa_init(&sh->mappings);
	hash_init(sh->seq_hash);
	hash_init(sh->chunk_hash);
	INIT_LIST_HEAD(&sh->send_queue);
	bio_list_init(&sh->overflow);
	bio_list_init(&sh->flush_bios);
	spin_lock_init(&sh->done_lock);
	bio_list_init(&sh->done_bios);
	init_waitqueue_head(&sh->fill_wait);
	init_waitqueue_head(&sh->read_wait);
	mutex_init(&sh->read_mutex);
	mutex_init(&sh->write_mutex);
	INIT_WORK(&sh->done_work, dmcow_done_work);
	INIT_WORK(&sh->flush_work, dmcow_flush_work);
	INIT_WORK(&sh->overflow_work, dmcow_overflow_work);
	sh->daemon = DMCOW_DAEMON_NONE;

	r = mempool_init_slab_pool(&sh->pending_pool, DMCOW_POOL_SIZE,
				   dmcow_pending_cache);
	if (r) {
		*error = "Cannot allocate request pool";
		goto bad;
	}

	sh->read_buf = kmalloc_array(DMCOW_READ_BATCH, sizeof(*sh->read_buf),
				     GFP_KERNEL);
	if (!sh->read_buf) {
		*error = "Cannot allocate read buffer";
		r = -ENOMEM;
		goto bad;
	}

	sh->wq = alloc_workqueue("dmcow-%s", WQ_MEM_RECLAIM, 0, ident);
	sh->flush_wq = alloc_workqueue("dmcow-flush-%s", WQ_MEM_RECLAIM, 0,
				       ident);
	if (!sh->wq || !sh->flush_wq) {
		*error = "Cannot allocate workqueue";
		r = -ENOMEM;
		goto bad;
	}

	sh->kc = dm_kcopyd_client_create(&dm_kcopyd_throttle);
	if (IS_ERR(sh->kc)) {
		*error = "Cannot create kcopyd client";
		r = PTR_ERR(sh->kc);
		sh->kc = NULL;
		goto bad;
	}

	snprintf(sh->misc_name, sizeof(sh->misc_name), "dm-cow-%s", ident);
	snprintf(sh->misc_nodename, sizeof(sh->misc_nodename), "dm-cow/%s",
		 ident);
	sh->misc.minor = MISC_DYNAMIC_MINOR;
	sh->misc.name = sh->misc_name;
	sh->misc.nodename = sh->misc_nodename;
	sh->misc.mode = 0600;
	sh->misc.fops = &dmcow_channel_fops;
	r = misc_register(&sh->misc);
	if (r) {
		*error = "Cannot register channel device";
		sh->misc.this_device = NULL;
		goto bad;
	}
	return sh;

bad:
	dmcow_shared_free(sh);
	return ERR_PTR(r);
}

/*
 * Take a channel reference; fails if the object is being destroyed.  Called
 * by open() under the misc device lock, which keeps @sh alive (its misc
 * device is deregistered before it is freed), so it must not take
 * dmcow_shared_mutex: ctr holds that across misc_register().  Never sleeps.
 */
bool dmcow_shared_get_channel(struct dmcow_shared *sh)
{
	return refcount_inc_not_zero(&sh->refs);
}

void dmcow_shared_put(struct dmcow_shared *sh)
{
	if (!refcount_dec_and_mutex_lock(&sh->refs, &dmcow_shared_mutex))
		return;
	/* Gone from the list and misc device before the ident can return. */
	list_del(&sh->list);
	dmcow_shared_free(sh);
	mutex_unlock(&dmcow_shared_mutex);
}

static int dmcow_attach(struct dmcow_target *t, const char *ident,
			u32 chunk_sectors, unsigned int features, char **error)
{
	struct dm_target *ti = t->ti;
	struct dmcow_shared *sh;
	unsigned long flags;

	mutex_lock(&dmcow_shared_mutex);
	sh = dmcow_shared_find(ident);
	if (sh) {
		if (sh->base_devt != t->base_dev->bdev->bd_dev ||
		    sh->cow_devt != t->cow_dev->bdev->bd_dev ||
		    sh->chunk_sectors != chunk_sectors ||
		    sh->features != features) {
			mutex_unlock(&dmcow_shared_mutex);
			*error = "Ident in use with different devices, chunk size or features";
			return -EINVAL;
		}
		refcount_inc(&sh->refs);
	} else {
		sh = dmcow_shared_create(ident, error);
		if (IS_ERR(sh)) {
			mutex_unlock(&dmcow_shared_mutex);
			return PTR_ERR(sh);
		}
		sh->base_devt = t->base_dev->bdev->bd_dev;
		sh->cow_devt = t->cow_dev->bdev->bd_dev;
		sh->chunk_sectors = chunk_sectors;
		sh->chunk_shift = ilog2(chunk_sectors);
		sh->features = features;
		refcount_set(&sh->refs, 1);
		list_add(&sh->list, &dmcow_shared_list);
	}

	mutex_lock(&sh->write_mutex);
	spin_lock_irqsave(&sh->lock, flags);
	list_add_tail(&t->list, &sh->targets);
	sh->nr_targets++;
	sh->base_bdev = t->base_dev->bdev;
	sh->cow_bdev = t->cow_dev->bdev;
	sh->dev_sectors = max_t(sector_t, sh->dev_sectors, ti->begin + ti->len);
	spin_unlock_irqrestore(&sh->lock, flags);
	mutex_unlock(&sh->write_mutex);

	mutex_unlock(&dmcow_shared_mutex);
	t->sh = sh;
	return 0;
}

static void dmcow_detach(struct dmcow_target *t)
{
	struct dmcow_shared *sh = t->sh;
	struct dmcow_target *o;
	sector_t end = 0;
	unsigned long flags;

	mutex_lock(&dmcow_shared_mutex);
	mutex_lock(&sh->write_mutex);
	list_del(&t->list);
	list_for_each_entry(o, &sh->targets, list)
		end = max_t(sector_t, end, o->ti->begin + o->ti->len);

	if (!--sh->nr_targets) {
		/* Nothing may touch the devices once the last target is gone. */
		wait_event(sh->fill_wait, dmcow_fills_idle(sh));
		spin_lock_irqsave(&sh->lock, flags);
		sh->base_bdev = NULL;
		sh->cow_bdev = NULL;
		sh->dev_sectors = 0;
		spin_unlock_irqrestore(&sh->lock, flags);
		flush_workqueue(sh->wq);
		flush_workqueue(sh->flush_wq);
	} else {
		spin_lock_irqsave(&sh->lock, flags);
		sh->dev_sectors = end;
		spin_unlock_irqrestore(&sh->lock, flags);
	}
	mutex_unlock(&sh->write_mutex);
	mutex_unlock(&dmcow_shared_mutex);
}

/*----------------------------------------------------------------
 * Target methods
 *--------------------------------------------------------------*/

/*
 * Construct a cow target:
 *
 *   <ident> <base_dev> <cow_dev> <chunk_sectors> [<#features> <feature>*]
 *
 * ident:         names the shared state (mappings, channel /dev/dm-cow/<ident>)
 *                of all cow targets with this ident, across table reloads.
 * base_dev:      data of chunks without mapping; sector s of the mapped
 *                device is sector s of base_dev.
 * cow_dev:       where the daemon places chunks.
 * chunk_sectors: power of two, 8..65536; the target start must be aligned.
 * features:      read_to_daemon - reads of unmapped chunks ask the daemon.
 */
static int dmcow_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	static const struct dm_arg _args[] = {
		{0, 1, "Invalid number of feature arguments"},
	};
	struct dmcow_target *t;
	struct dm_arg_set as;
	unsigned int chunk_sectors, nr_features, features = 0;
	const char *ident, *arg;
	int r;

	if (argc < 4) {
		ti->error = "Invalid argument count";
		return -EINVAL;
	}
	as.argc = argc;
	as.argv = argv;

	ident = dm_shift_arg(&as);
	if (!dmcow_ident_valid(ident)) {
		ti->error = "Invalid ident";
		return -EINVAL;
	}

	t = kzalloc(sizeof(*t), GFP_KERNEL);
	if (!t) {
		ti->error = "Cannot allocate target context";
		return -ENOMEM;
	}
	t->ti = ti;

	/* base_dev is only ever read. */
	r = dm_get_device(ti, dm_shift_arg(&as), FMODE_READ, &t->base_dev);
	if (r) {
		ti->error = "Cannot open base device";
		goto bad_base;
	}

	r = dm_get_device(ti, dm_shift_arg(&as), dm_table_get_mode(ti->table),
			  &t->cow_dev);
	if (r) {
		ti->error = "Cannot open cow device";
		goto bad_cow;
	}

	r = -EINVAL;
	if (kstrtouint(dm_shift_arg(&as), 10, &chunk_sectors) ||
	    !is_power_of_2(chunk_sectors) || chunk_sectors < 8 ||
	    chunk_sectors > DMCOW_MAX_CHUNK_SECTORS) {
		ti->error = "Invalid chunk size";
		goto bad;
	}
	if (ti->begin & (chunk_sectors - 1)) {
		ti->error = "Target start is not chunk aligned";
		goto bad;
	}

	if (as.argc) {
		r = dm_read_arg_group(_args, &as, &nr_features, &ti->error);
		if (r)
			goto bad;
		while (nr_features--) {
			arg = dm_shift_arg(&as);
			if (!strcasecmp(arg, "read_to_daemon")) {
				features |= DMCOW_FEATURE_READ_TO_DAEMON;
			} else {
				ti->error = "Unknown feature";
				r = -EINVAL;
				goto bad;
			}
		}
		if (as.argc) {
			ti->error = "Too many arguments";
			r = -EINVAL;
			goto bad;
		}
	}

	r = dm_set_target_max_io_len(ti, chunk_sectors);
	if (r) {
		ti->error = "Cannot set maximum I/O length";
		goto bad;
	}

	r = dmcow_attach(t, ident, chunk_sectors, features, &ti->error);
	if (r)
		goto bad;

	ti->num_flush_bios = 1;
	ti->flush_supported = true;
	ti->per_io_data_size = sizeof(struct dmcow_bio);
	ti->private = t;
	return 0;

bad:
	dm_put_device(ti, t->cow_dev);
bad_cow:
	dm_put_device(ti, t->base_dev);
bad_base:
	kfree(t);
	return r;
}

static void dmcow_dtr(struct dm_target *ti)
{
	struct dmcow_target *t = ti->private;
	struct dmcow_shared *sh = t->sh;

	dmcow_detach(t);
	dm_put_device(ti, t->cow_dev);
	dm_put_device(ti, t->base_dev);
	dmcow_shared_put(sh);
	kfree(t);
}

static int dmcow_map(struct dm_target *ti, struct bio *bio)
{
	struct dmcow_target *t = ti->private;
	struct dmcow_shared *sh = t->sh;
	struct dmcow_bio *pb = dmcow_pb(bio);

	pb->sh = sh;
	pb->t = t;
	pb->fill = NULL;
	pb->flags = 0;

	if (bio->bi_opf & REQ_PREFLUSH) {
		dmcow_queue_flush(sh, bio);
		return DM_MAPIO_SUBMITTED;
	}

	switch (bio_op(bio)) {
	case REQ_OP_READ:
	case REQ_OP_WRITE:
		break;
	default:
		return DM_MAPIO_KILL;
	}

	if (!bio_sectors(bio)) {
		bio_set_dev(bio, t->cow_dev->bdev);
		return DM_MAPIO_REMAPPED;
	}

	return dmcow_dispatch(sh, bio);
}

/*
 * A noflush suspend must not wait for the daemon: push the bios of this
 * target that wait for a reply back to dm core, which reissues them after
 * the resume (the requests themselves stay outstanding).  Until then new
 * bios that would wait are pushed back at once.  A suspend with flush
 * waits for the replies: see the reload rule in docs/abi.md.
 */
static void dmcow_presuspend(struct dm_target *ti)
{
	struct dmcow_target *t = ti->private;
	struct dmcow_shared *sh = t->sh;
	struct dmcow_pending *p;
	struct bio_list requeue;
	unsigned long flags;
	int bkt;

	if (!dm_noflush_suspending(ti))
		return;

	bio_list_init(&requeue);
	spin_lock_irqsave(&sh->lock, flags);
	t->requeue = true;
	hash_for_each(sh->chunk_hash, bkt, p, chunk_node)
		if (p->lock_state == DMCOW_LOCK_WAIT)
			dmcow_take_requeued(sh, &p->bios, &requeue);
	hash_for_each(sh->seq_hash, bkt, p, seq_node)
		if (p->kind == DMCOW_REQ_FLUSH)
			dmcow_take_requeued(sh, &p->bios, &requeue);
	dmcow_take_requeued(sh, &sh->flush_bios, &requeue);
	dmcow_take_requeued(sh, &sh->overflow, &requeue);
	spin_unlock_irqrestore(&sh->lock, flags);

	dmcow_fail_bios(&requeue, BLK_STS_DM_REQUEUE);
}

static void dmcow_requeue_off(struct dm_target *ti)
{
	struct dmcow_target *t = ti->private;
	unsigned long flags;

	spin_lock_irqsave(&t->sh->lock, flags);
	t->requeue = false;
	spin_unlock_irqrestore(&t->sh->lock, flags);
}

static const char *dmcow_daemon_name(enum dmcow_daemon_state state)
{
	switch (state) {
	case DMCOW_DAEMON_NONE:
		return "none";
	case DMCOW_DAEMON_READY:
		return "ready";
	default:
		return "handshake";
	}
}

/*
 * INFO: <mapped_chunks> <outstanding_requests> <requests> <copies>
 *       <zero_fills> <copies_skipped> <flush_acks> <errors> <daemon>
 *       <cached_chunks> <cache_chunks> <dropped_chunks>
 */
static void dmcow_status(struct dm_target *ti, status_type_t type,
			 unsigned int status_flags, char *result,
			 unsigned int maxlen)
{
	struct dmcow_target *t = ti->private;
	struct dmcow_shared *sh = t->sh;
	unsigned long long mapped, requests, copies, zero_fills, skipped;
	unsigned long long flushes, errors, cached, dropped;
	enum dmcow_daemon_state daemon;
	unsigned int outstanding;
	unsigned long flags;
	unsigned int sz = 0;

	switch (type) {
	case STATUSTYPE_INFO:
		spin_lock_irqsave(&sh->lock, flags);
		mapped = sh->nr_mapped;
		outstanding = sh->nr_requests;
		requests = sh->stat_requests;
		copies = sh->stat_copies;
		zero_fills = sh->stat_zero_fills;
		skipped = sh->stat_copies_skipped;
		flushes = sh->stat_flushes;
		errors = sh->stat_errors;
		daemon = sh->daemon;
		cached = sh->nr_cached;
		dropped = sh->stat_dropped;
		spin_unlock_irqrestore(&sh->lock, flags);
		DMEMIT("%llu %u %llu %llu %llu %llu %llu %llu %s %llu %llu %llu",
		       mapped, outstanding, requests, copies, zero_fills,
		       skipped, flushes, errors, dmcow_daemon_name(daemon),
		       cached, dmcow_cache_max(), dropped);
		break;

	case STATUSTYPE_TABLE:
		DMEMIT("%s %s %s %u", sh->ident, t->base_dev->name,
		       t->cow_dev->name, sh->chunk_sectors);
		if (sh->features & DMCOW_FEATURE_READ_TO_DAEMON)
			DMEMIT(" 1 read_to_daemon");
		break;

	case STATUSTYPE_IMA:
		*result = '\0';
		break;
	}
}

static int dmcow_iterate_devices(struct dm_target *ti,
				 iterate_devices_callout_fn fn, void *data)
{
	struct dmcow_target *t = ti->private;
	int r;

	r = fn(ti, t->base_dev, ti->begin, ti->len, data);
	if (r)
		return r;
	return fn(ti, t->cow_dev, 0, bdev_nr_sectors(t->cow_dev->bdev), data);
}

static struct target_type dmcow_target = {
	.name            = "cow",
	.version         = {1, 0, 0},
	.module          = THIS_MODULE,
	.ctr             = dmcow_ctr,
	.dtr             = dmcow_dtr,
	.map             = dmcow_map,
	.presuspend      = dmcow_presuspend,
	.presuspend_undo = dmcow_requeue_off,
	.resume          = dmcow_requeue_off,
	.status          = dmcow_status,
	.iterate_devices = dmcow_iterate_devices,
};

static int __init dm_cow_init(void)
{
	int r;

	dmcow_pending_cache = KMEM_CACHE(dmcow_pending, 0);
	if (!dmcow_pending_cache)
		return -ENOMEM;

	r = dm_register_target(&dmcow_target);
	if (r < 0) {
		DMERR("register failed %d", r);
		kmem_cache_destroy(dmcow_pending_cache);
	}
	return r;
}

static void __exit dm_cow_exit(void)
{
	dm_unregister_target(&dmcow_target);
	/* Every target and channel holds a module reference. */
	WARN_ON(!list_empty(&dmcow_shared_list));
	kmem_cache_destroy(dmcow_pending_cache);
}

module_init(dm_cow_init);
module_exit(dm_cow_exit);

MODULE_DESCRIPTION(DM_NAME " copy-on-write target with userspace allocation");
MODULE_LICENSE("GPL");
