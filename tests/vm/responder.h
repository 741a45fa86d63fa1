// A minimal dm-cow daemon for tests: a channel wrapper and a responder that
// serves requests from a thread with a bump allocator on cow_dev.  It speaks
// only kmod/dm-cow-abi.h; see docs/abi.md for the protocol.
//
// Thread-safety: Responder's public methods may be called from any thread
// while its service thread runs.  Channel is not thread-safe except that
// Write() may race with the service thread (the kernel serialises replies).

#ifndef DMCOW_TESTS_VM_RESPONDER_H_
#define DMCOW_TESTS_VM_RESPONDER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dm-cow-abi.h"
#include "dmcowd/replies.h"

namespace dmcow {

std::string ChannelPath(const std::string& ident);

// One open /dev/dm-cow/<ident>.
class Channel {
 public:
  Channel() = default;
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Returns 0 or -errno.
  int Open(const std::string& ident, bool nonblock = false);
  void Close();
  int fd() const { return fd_; }

  // Reads up to `max` requests; returns their number or -errno.
  int Read(std::vector<dmcow_request>* out, size_t max = 64);
  // Waits up to timeout_ms for POLLIN; returns >0 if readable, 0, or -errno.
  int Poll(int timeout_ms);
  // Returns bytes written or -errno.
  ssize_t WriteRaw(const void* buf, size_t len);
  ssize_t Write(const std::vector<dmcow_reply>& replies);
  ssize_t Write(const dmcow_reply& reply) { return WriteRaw(&reply, sizeof(reply)); }

  // Reads HELLO and answers it with `version`.  Returns 0 or -errno.
  int Handshake(uint32_t version = DMCOW_ABI_VERSION, dmcow_request* hello_out = nullptr, int timeout_ms = 5000);

 private:
  int fd_ = -1;
};

// The reply builders dmcowd uses too (daemon/include/dmcowd/replies.h).
using dmcow_replies::ErrorReply;
using dmcow_replies::FlushAck;
using dmcow_replies::InvalidateReply;
using dmcow_replies::MapReply;
using dmcow_replies::PushReply;

// Serves a channel from a thread.  Default policy: MAP_WRITE -> RW mapping at
// the next free cow chunk, MAP_READ -> BASE, FLUSH -> FLUSH_ACK (unless
// flushes are held).
class Responder {
 public:
  // A hook may answer a request itself: append replies and return true.
  using Hook = std::function<bool(const dmcow_request&, std::vector<dmcow_reply>*)>;

  Responder(std::string ident, uint32_t chunk_sectors, uint64_t first_cow_chunk = 0);
  ~Responder();
  Responder(const Responder&) = delete;
  Responder& operator=(const Responder&) = delete;

  int Start();  // opens, handshakes, starts the thread; 0 or -errno
  void Stop();  // stops the thread and closes the channel

  void SetHook(Hook hook);
  void SetReplyDelayMs(int ms) { reply_delay_ms_ = ms; }
  void HoldFlushes(bool hold);
  void ReleaseFlushes();                   // acks every held FLUSH
  ssize_t Send(const dmcow_reply& reply);  // PUSH/INVALIDATE from outside
  uint64_t AllocCow(uint64_t nr_chunks);   // returns a cow sector

  size_t Count(uint32_t kind) const;
  size_t CountChunk(uint32_t kind, uint64_t chunk) const;
  size_t HeldFlushes() const;
  // cow sector of the RW mapping the default policy gave `chunk`, or ~0.
  uint64_t CowOf(uint64_t chunk) const;
  std::vector<dmcow_request> Log() const;
  std::string Error() const;  // first failed write(), if any
  uint32_t chunk_sectors() const { return chunk_sectors_; }

 private:
  void Run();
  void Handle(const dmcow_request& req, std::vector<dmcow_reply>* out);

  const std::string ident_;
  const uint32_t chunk_sectors_;
  Channel chan_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<int> reply_delay_ms_{0};
  mutable std::mutex mu_;
  Hook hook_;                           // guarded by mu_
  uint64_t next_cow_chunk_;             // guarded by mu_
  bool hold_flushes_ = false;           // guarded by mu_
  std::vector<uint64_t> held_flushes_;  // guarded by mu_
  std::vector<dmcow_request> log_;      // guarded by mu_
  std::map<uint64_t, uint64_t> rw_;     // chunk -> cow sector; mu_
  std::string error_;                   // guarded by mu_
};

}  // namespace dmcow

#endif  // DMCOW_TESTS_VM_RESPONDER_H_
