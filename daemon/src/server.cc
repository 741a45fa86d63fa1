#include "server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "log.h"

namespace dmcowd {

Server::Server(ReplySink* sink, Plugin* plugin, std::mutex* plugin_mu, int reclaim_fd)
    : sink_(sink), plugin_(plugin), plugin_mu_(plugin_mu), reclaim_fd_(reclaim_fd) {
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

Server::~Server() {
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

void Server::Stop() {
  const uint64_t one = 1;
  ssize_t ignored = ::write(stop_fd_, &one, sizeof(one));
  (void)ignored;
}

Status Server::Run(Channel* chan) {
  if (stop_fd_ < 0) return Status::IOError(std::string("eventfd: ") + std::strerror(errno));
  // Reads must not block: serving_mu_ is held across them, and requests can
  // vanish between poll and read (an INVALIDATE ends unread ones).
  const int flags = ::fcntl(chan->fd(), F_GETFL);
  if (flags < 0 || ::fcntl(chan->fd(), F_SETFL, flags | O_NONBLOCK) < 0) {
    return Status::IOError(chan->path() + ": non-blocking: " + std::strerror(errno));
  }
  dmcow_request reqs[kMaxBatch];
  for (;;) {
    pollfd p[2] = {{chan->fd(), POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return Status::IOError(std::string("poll: ") + std::strerror(errno));
    }
    if (p[1].revents) return Status::OK();
    if (!(p[0].revents & POLLIN)) {
      if (p[0].revents & (POLLERR | POLLHUP | POLLNVAL)) return Status::IOError(chan->path() + ": channel hung up");
      continue;
    }
    std::lock_guard<std::mutex> serving(serving_mu_);
    int n = chan->Read(reqs, kMaxBatch);
    if (n == -EAGAIN) continue;
    if (n < 0) return Status::IOError(chan->path() + ": read: " + std::strerror(-n));
    if (n == 0) continue;
    DMCOW_RETURN_IF_ERROR(ProcessBatch(reqs, static_cast<size_t>(n)));
  }
}

Status Server::ProcessBatch(const dmcow_request* reqs, size_t n) {
  batch_++;
  stats_.batches++;
  bool reclaim;
  {
    std::lock_guard<std::mutex> l(*plugin_mu_);
    for (size_t i = 0; i < n; i++) Answer(reqs[i], &replies_[i], &mreqs_[i], &mappings_[i]);
    reclaim = plugin_->WantsReclaim();
  }
  for (size_t i = 0; i < n; i++) is_map_[i] = replies_[i].kind == DMCOW_REP_MAP;
  Status s = WriteReplies(n);
  if (reclaim && reclaim_fd_ >= 0) {
    const uint64_t one = 1;
    ssize_t ignored = ::write(reclaim_fd_, &one, sizeof(one));
    (void)ignored;
  }
  return s;
}

// Called with *plugin_mu_ held.
void Server::Answer(const dmcow_request& req, dmcow_reply* rep, MapRequest* mreq, Mapping* mapping) {
  switch (req.kind) {
    case DMCOW_REQ_MAP_WRITE:
    case DMCOW_REQ_MAP_READ: {
      stats_.maps++;
      mreq->chunk = req.chunk;
      mreq->write = req.kind == DMCOW_REQ_MAP_WRITE;
      mreq->full_chunk = req.flags & DMCOW_REQ_F_FULL_CHUNK;
      mreq->batch = batch_;
      dmcowd::Answer answer;
      const auto t0 = std::chrono::steady_clock::now();
      Status s = plugin_->Map(*mreq, &answer);
      stats_.map_ns += static_cast<uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
      if (!s.ok()) {
        LOG_ERROR("chunk %llu: %s", static_cast<unsigned long long>(req.chunk), s.ToString().c_str());
        answer.error = EIO;
      }
      if (answer.error) {
        if (answer.error != ENOSPC || LogEnabled(LogLevel::kDebug))
          LOG_WARN("chunk %llu: refused with %s", static_cast<unsigned long long>(req.chunk),
                   std::strerror(answer.error));
        stats_.errors++;
        *rep = MakeError(req.seq, answer.error);
        return;
      }
      *mapping = answer.mapping;
      *rep = MakeMapReply(req.seq, answer.mapping);
      LOG_DEBUG("%s chunk %llu -> kind %u at sector %llu", mreq->write ? "write" : "read",
                static_cast<unsigned long long>(req.chunk), rep->map, static_cast<unsigned long long>(rep->cow_sector));
      return;
    }
    case DMCOW_REQ_FLUSH: {
      stats_.flushes++;
      // The kernel vouches for the data of replies written before this
      // batch was read: batches up to batch_ - 1.
      Status s = plugin_->Flush(batch_ - 1);
      if (!s.ok()) {
        LOG_ERROR("flush: %s", s.ToString().c_str());
        stats_.errors++;
        *rep = MakeError(req.seq, EIO);
      } else {
        *rep = MakeFlushAck(req.seq);
      }
      return;
    }
    default:
      LOG_ERROR("request of unknown kind %u (seq %llu)", req.kind, static_cast<unsigned long long>(req.seq));
      stats_.errors++;
      *rep = MakeError(req.seq, EINVAL);
      return;
  }
}

Status Server::WriteReplies(size_t n) {
  size_t i = 0;
  int busy_retries = 0;
  while (i < n) {
    ssize_t w = sink_->Write(&replies_[i], n - i);
    if (w > 0) {
      i += static_cast<size_t>(w) / sizeof(dmcow_reply);
      continue;  // if short, message i was refused: the next write names why
    }
    const int err = w == 0 ? EIO : static_cast<int>(-w);
    if (err == ENODEV) return Status::IOError("reply: no dm-cow target with this ident exists any more");
    if ((err == EBUSY || err == ENOMEM) && busy_retries++ < 100) {
      std::this_thread::sleep_for(std::chrono::milliseconds(err == EBUSY ? 1 : 10));
      continue;
    }
    Refused(i, err);
    i++;
    busy_retries = 0;
  }
  return Status::OK();
}

// The kernel refused reply i with `err`: the request is still outstanding.
void Server::Refused(size_t i, int err) {
  stats_.refused++;
  const dmcow_reply& r = replies_[i];
  LOG_ERROR("kernel refused reply (kind %u, seq %llu, chunk %llu): %s", r.kind, static_cast<unsigned long long>(r.seq),
            static_cast<unsigned long long>(r.chunk), std::strerror(err));
  if (is_map_[i]) {
    std::lock_guard<std::mutex> l(*plugin_mu_);
    plugin_->Retract(mreqs_[i], mappings_[i]);
  }
  if (r.kind == DMCOW_REP_ERROR) return;  // nothing better to say
  dmcow_reply e = MakeError(r.seq, EIO);
  stats_.errors++;
  ssize_t w = sink_->Write(&e, 1);
  if (w < 0)
    LOG_ERROR("error reply for seq %llu refused too: %s", static_cast<unsigned long long>(r.seq),
              std::strerror(static_cast<int>(-w)));
}

}  // namespace dmcowd
