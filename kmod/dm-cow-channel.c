// SPDX-License-Identifier: GPL-2.0
/*
 * dm-cow daemon channel: the misc device /dev/dm-cow/<ident>.
 *
 * One daemon at a time may hold the channel open (CAP_SYS_ADMIN).  read()
 * hands out requests in FIFO order, write() applies replies in order and
 * rejects malformed ones, poll() reports readable requests.  Releasing the
 * file is how the kernel learns that the daemon died.  See docs/abi.md.
 */

#include "dm-cow.h"

#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/poll.h>
#include <linux/sched.h>
#include <linux/uaccess.h>

static void dmcow_encode(struct dmcow_request *msg, struct dmcow_pending *p)
{
	memset(msg, 0, sizeof(*msg));
	msg->seq = p->seq;
	msg->kind = p->kind;
	msg->flags = p->req_flags;
	if (p->kind != DMCOW_REQ_FLUSH) {
		msg->chunk = p->chunk;
		msg->nr_chunks = 1;
	}
}

/*
 * Move up to @max requests to sh->read_buf, marking them SENT.  A FLUSH whose
 * fills are not yet durable stops the batch (requests behind it wait, so a
 * stream of new fills cannot starve it) and kicks the flush worker.
 * NOTE: Must be called with sh->lock held.
 */
static size_t dmcow_collect(struct dmcow_shared *sh, u64 *seqs, size_t max)
{
	struct dmcow_request *msg = sh->read_buf;
	struct dmcow_pending *p, *tmp;
	size_t n = 0;

	lockdep_assert_held(&sh->lock);

	if (sh->daemon == DMCOW_DAEMON_HELLO) {
		memset(msg, 0, sizeof(*msg));
		sh->hello_seq = ++sh->next_seq;
		msg->seq = sh->hello_seq;
		msg->kind = DMCOW_REQ_HELLO;
		msg->nr_chunks = dmcow_dev_chunks(sh);
		msg->cow_sectors = sh->cow_bdev ? bdev_nr_sectors(sh->cow_bdev) : 0;
		msg->version = DMCOW_ABI_VERSION;
		msg->chunk_sectors = sh->chunk_sectors;
		msg->features = sh->features;
		msg->max_requests = dmcow_max_requests;
		seqs[0] = msg->seq;
		sh->daemon = DMCOW_DAEMON_HELLO_SENT;
		return 1;
	}
	if (sh->daemon != DMCOW_DAEMON_READY)
		return 0;

	list_for_each_entry_safe(p, tmp, &sh->send_queue, queue_node) {
		if (n == max)
			break;
		if (p->kind == DMCOW_REQ_FLUSH && !dmcow_flush_ready(sh, p)) {
			sh->flush_stale = true;
			queue_work(sh->flush_wq, &sh->flush_work);
			break;
		}
		dmcow_encode(&msg[n], p);
		seqs[n++] = p->seq;
		list_del_init(&p->queue_node);
		p->req_state = DMCOW_REQ_SENT;
	}
	return n;
}

/* copy_to_user failed: put the collected requests back, in order. */
static void dmcow_uncollect(struct dmcow_shared *sh, u64 *seqs, size_t n)
{
	struct dmcow_pending *p;
	unsigned long flags;

	spin_lock_irqsave(&sh->lock, flags);
	while (n--) {
		if (sh->daemon == DMCOW_DAEMON_HELLO_SENT &&
		    seqs[n] == sh->hello_seq) {
			sh->daemon = DMCOW_DAEMON_HELLO;
			continue;
		}
		p = dmcow_seq_lookup(sh, seqs[n]);
		if (p && p->req_state == DMCOW_REQ_SENT) {
			p->req_state = DMCOW_REQ_QUEUED;
			list_add(&p->queue_node, &sh->send_queue);
		}
	}
	spin_unlock_irqrestore(&sh->lock, flags);
}

static bool dmcow_readable(struct dmcow_shared *sh)
{
	struct dmcow_pending *p;
	unsigned long flags;
	bool r = false;

	spin_lock_irqsave(&sh->lock, flags);
	if (sh->daemon == DMCOW_DAEMON_HELLO) {
		r = true;
	} else if (sh->daemon == DMCOW_DAEMON_READY &&
		   !list_empty(&sh->send_queue)) {
		p = list_first_entry(&sh->send_queue, struct dmcow_pending,
				     queue_node);
		r = p->kind != DMCOW_REQ_FLUSH || dmcow_flush_ready(sh, p);
		if (!r) {
			sh->flush_stale = true;
			queue_work(sh->flush_wq, &sh->flush_work);
		}
	}
	spin_unlock_irqrestore(&sh->lock, flags);
	return r;
}

static int dmcow_chan_open(struct inode *inode, struct file *file)
{
	struct miscdevice *misc = file->private_data;
	struct dmcow_shared *sh = container_of(misc, struct dmcow_shared, misc);
	unsigned long flags;
	int r;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	r = stream_open(inode, file);
	if (r)
		return r;

	/*
	 * No failure after the reference is taken: a put here, under the
	 * misc device lock, could be the last one and deregister the device.
	 */
	spin_lock_irqsave(&sh->lock, flags);
	if (sh->daemon != DMCOW_DAEMON_NONE)
		r = -EBUSY;
	else if (!dmcow_shared_get_channel(sh))
		r = -ENODEV;
	else
		sh->daemon = DMCOW_DAEMON_HELLO;
	spin_unlock_irqrestore(&sh->lock, flags);
	if (r)
		return r;

	file->private_data = sh;
	return 0;
}

static int dmcow_chan_release(struct inode *inode, struct file *file)
{
	struct dmcow_shared *sh = file->private_data;

	dmcow_daemon_gone(sh);
	dmcow_shared_put(sh);
	return 0;
}

static ssize_t dmcow_chan_read(struct file *file, char __user *buf,
			       size_t count, loff_t *ppos)
{
	struct dmcow_shared *sh = file->private_data;
	size_t max = min_t(size_t, count / sizeof(struct dmcow_request),
			   DMCOW_READ_BATCH);
	u64 *seqs = sh->read_seqs;
	unsigned long flags;
	ssize_t r;
	size_t n;

	if (!max)
		return -EINVAL;
	if (mutex_lock_interruptible(&sh->read_mutex))
		return -ERESTARTSYS;

	for (;;) {
		spin_lock_irqsave(&sh->lock, flags);
		n = dmcow_collect(sh, seqs, max);
		spin_unlock_irqrestore(&sh->lock, flags);
		if (n)
			break;
		if (file->f_flags & O_NONBLOCK) {
			r = -EAGAIN;
			goto out;
		}
		if (wait_event_interruptible(sh->read_wait, dmcow_readable(sh))) {
			r = -ERESTARTSYS;
			goto out;
		}
	}

	if (copy_to_user(buf, sh->read_buf, n * sizeof(struct dmcow_request))) {
		dmcow_uncollect(sh, seqs, n);
		r = -EFAULT;
		goto out;
	}
	r = n * sizeof(struct dmcow_request);
out:
	mutex_unlock(&sh->read_mutex);
	return r;
}

static int dmcow_hello(struct dmcow_shared *sh, const struct dmcow_reply *rep)
{
	unsigned long flags;
	int r = 0;

	if (rep->map || rep->chunk || rep->nr_chunks || rep->cow_sector ||
	    rep->error)
		return -EINVAL;

	spin_lock_irqsave(&sh->lock, flags);
	if (sh->daemon != DMCOW_DAEMON_HELLO_SENT)
		r = -EPROTO;
	else if (rep->seq != sh->hello_seq)
		r = -EINVAL;
	else if (rep->version != DMCOW_ABI_VERSION)
		r = -EPROTONOSUPPORT;
	else
		sh->daemon = DMCOW_DAEMON_READY;
	if (!r)
		wake_up(&sh->read_wait);
	spin_unlock_irqrestore(&sh->lock, flags);
	return r;
}

/* Static checks of a MAP/PUSH/INVALIDATE extent (write_mutex held). */
static int dmcow_check_extent(struct dmcow_shared *sh,
			      const struct dmcow_reply *rep)
{
	struct block_device *cow = sh->cow_bdev;
	u64 dev_chunks, cow_size, span;
	unsigned int lbs;
	bool need_cow = false;

	if (rep->version || rep->error)
		return -EINVAL;
	if ((rep->kind == DMCOW_REP_MAP) != (rep->seq != 0))
		return -EINVAL;

	if (rep->kind == DMCOW_REP_INVALIDATE) {
		if (rep->map || rep->cow_sector)
			return -EINVAL;
	} else {
		switch (rep->map) {
		case DMCOW_MAP_RW:
		case DMCOW_MAP_RO:
		case DMCOW_MAP_FILLED_RW:
			need_cow = true;
			break;
		case DMCOW_MAP_ZERO:
		case DMCOW_MAP_BASE:
			if (rep->cow_sector)
				return -EINVAL;
			break;
		default:
			return -EINVAL;
		}
	}

	if (!cow)
		return -ENODEV;		/* no target attached */

	dev_chunks = dmcow_dev_chunks(sh);
	if (!rep->nr_chunks || rep->chunk >= dev_chunks ||
	    rep->nr_chunks > dev_chunks - rep->chunk)
		return -EINVAL;
	if (rep->map == DMCOW_MAP_RW && rep->nr_chunks > DMCOW_MAX_FILL_EXTENT)
		return -EINVAL;

	if (need_cow) {
		cow_size = bdev_nr_sectors(cow);
		lbs = bdev_logical_block_size(cow) >> SECTOR_SHIFT;
		if (rep->nr_chunks > (cow_size >> sh->chunk_shift))
			return -EINVAL;
		span = rep->nr_chunks << sh->chunk_shift;
		if (rep->cow_sector > cow_size - span ||
		    (lbs > 1 && rep->cow_sector % lbs))
			return -EINVAL;
	}
	return 0;
}

static int dmcow_process_reply(struct dmcow_shared *sh,
			       const struct dmcow_reply *rep)
{
	enum dmcow_daemon_state daemon;
	unsigned long flags;
	int r;

	if (rep->reserved[0] || rep->reserved[1])
		return -EINVAL;

	switch (rep->kind) {
	case DMCOW_REP_HELLO:
		return dmcow_hello(sh, rep);
	case DMCOW_REP_MAP:
	case DMCOW_REP_PUSH:
	case DMCOW_REP_INVALIDATE:
	case DMCOW_REP_FLUSH_ACK:
	case DMCOW_REP_ERROR:
		break;
	default:
		return -EINVAL;
	}

	spin_lock_irqsave(&sh->lock, flags);
	daemon = sh->daemon;
	spin_unlock_irqrestore(&sh->lock, flags);
	if (daemon != DMCOW_DAEMON_READY)
		return -EPROTO;

	switch (rep->kind) {
	case DMCOW_REP_FLUSH_ACK:
	case DMCOW_REP_ERROR:
		if (rep->map || rep->chunk || rep->nr_chunks ||
		    rep->cow_sector || rep->version || !rep->seq)
			return -EINVAL;
		if ((rep->kind == DMCOW_REP_ERROR) !=
		    (rep->error > 0 && rep->error < MAX_ERRNO))
			return -EINVAL;
		return dmcow_complete_request(sh, rep);
	default:
		r = dmcow_check_extent(sh, rep);
		if (r)
			return r;
		return dmcow_apply(sh, rep);
	}
}

static ssize_t dmcow_chan_write(struct file *file, const char __user *buf,
				size_t count, loff_t *ppos)
{
	struct dmcow_shared *sh = file->private_data;
	struct dmcow_reply rep;
	size_t i, n;
	int r = 0;

	if (!count || count % sizeof(rep))
		return -EINVAL;
	n = count / sizeof(rep);

	if (mutex_lock_interruptible(&sh->write_mutex))
		return -ERESTARTSYS;
	for (i = 0; i < n; i++) {
		if (copy_from_user(&rep, buf + i * sizeof(rep), sizeof(rep))) {
			r = -EFAULT;
			break;
		}
		r = dmcow_process_reply(sh, &rep);
		if (r)
			break;
		cond_resched();
	}
	mutex_unlock(&sh->write_mutex);

	if (i)
		return i * sizeof(rep);
	return r;
}

static __poll_t dmcow_chan_poll(struct file *file, poll_table *wait)
{
	struct dmcow_shared *sh = file->private_data;
	__poll_t mask = EPOLLOUT | EPOLLWRNORM;

	poll_wait(file, &sh->read_wait, wait);
	if (dmcow_readable(sh))
		mask |= EPOLLIN | EPOLLRDNORM;
	return mask;
}

const struct file_operations dmcow_channel_fops = {
	.owner		= THIS_MODULE,
	.open		= dmcow_chan_open,
	.release	= dmcow_chan_release,
	.read		= dmcow_chan_read,
	.write		= dmcow_chan_write,
	.poll		= dmcow_chan_poll,
	.llseek		= no_llseek,
};
