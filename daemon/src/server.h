// Server: the event loop on the channel (daemon/DESIGN.md, "Event loop").
// Reads batches of up to 64 requests, asks the plugin, and writes the
// batch's replies with one write(2). Batches are numbered from 1; a FLUSH
// read in batch b asks the plugin to persist batches <= b - 1.
//
// Thread safety: Run on one thread; Stop and stats from any other. Plugin
// calls take *plugin_mu. The server holds serving_mutex() from reading a
// batch until its replies are written: whoever holds it knows that every
// request read so far has been answered (the daemon's reclaim needs that).
#ifndef DMCOWD_SERVER_H_
#define DMCOWD_SERVER_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

#include "channel.h"
#include "dmcowd/plugin.h"

namespace dmcowd {

struct ServerStats {
  std::atomic<uint64_t> batches{0};
  std::atomic<uint64_t> maps{0};
  std::atomic<uint64_t> map_ns{0};  // time inside Plugin::Map (where a request's cost is)
  std::atomic<uint64_t> flushes{0};
  std::atomic<uint64_t> errors{0};   // ERROR replies sent
  std::atomic<uint64_t> refused{0};  // replies the kernel refused
};

class Server {
 public:
  // `reclaim_fd` (an eventfd, or -1): written when the plugin wants a reclaim.
  Server(ReplySink* sink, Plugin* plugin, std::mutex* plugin_mu, int reclaim_fd = -1);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Serves `chan` until Stop() or a channel error; returns the error.
  Status Run(Channel* chan);
  void Stop();

  // One batch: answers `reqs` and writes the replies. Public for tests.
  Status ProcessBatch(const dmcow_request* reqs, size_t n);

  std::mutex& serving_mutex() { return serving_mu_; }
  const ServerStats& stats() const { return stats_; }
  uint64_t batch() const { return batch_; }

 private:
  void Answer(const dmcow_request& req, dmcow_reply* rep, MapRequest* mreq, Mapping* mapping);
  Status WriteReplies(size_t n);
  void Refused(size_t i, int err);

  ReplySink* const sink_;
  Plugin* const plugin_;
  std::mutex* const plugin_mu_;
  const int reclaim_fd_;
  std::mutex serving_mu_;
  int stop_fd_ = -1;  // eventfd
  uint64_t batch_ = 0;
  ServerStats stats_;

  // Per batch: the replies and, for MAP replies, what the plugin decided.
  dmcow_reply replies_[kMaxBatch];
  MapRequest mreqs_[kMaxBatch];
  Mapping mappings_[kMaxBatch];
  bool is_map_[kMaxBatch];
};

}  // namespace dmcowd

#endif  // DMCOWD_SERVER_H_
