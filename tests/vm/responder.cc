// Test responder for dm-cow (see responder.h).  Built into the VM test
// driver, and on its own as a small daemon:
//
//   responder <ident> <chunk_sectors> [--first-cow-chunk N] [--no-reply]
//             [--flush-delay-ms N]
//
// --no-reply reads requests and never answers them (a hung daemon), which
// the daemon-death test kills with SIGKILL.

#include "responder.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace dmcow {

std::string ChannelPath(const std::string& ident) { return std::string(DMCOW_DEV_DIR) + ident; }

Channel::~Channel() { Close(); }

int Channel::Open(const std::string& ident, bool nonblock) {
  Close();
  int flags = O_RDWR | O_CLOEXEC | (nonblock ? O_NONBLOCK : 0);
  fd_ = ::open(ChannelPath(ident).c_str(), flags);
  return fd_ < 0 ? -errno : 0;
}

void Channel::Close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

int Channel::Read(std::vector<dmcow_request>* out, size_t max) {
  out->resize(max);
  ssize_t n = ::read(fd_, out->data(), max * sizeof(dmcow_request));
  if (n < 0) {
    out->clear();
    return -errno;
  }
  out->resize(static_cast<size_t>(n) / sizeof(dmcow_request));
  return static_cast<int>(out->size());
}

int Channel::Poll(int timeout_ms) {
  pollfd p = {fd_, POLLIN, 0};
  int r = ::poll(&p, 1, timeout_ms);
  if (r < 0) return -errno;
  return r > 0 && (p.revents & POLLIN) ? 1 : 0;
}

ssize_t Channel::WriteRaw(const void* buf, size_t len) {
  ssize_t n = ::write(fd_, buf, len);
  return n < 0 ? -errno : n;
}

ssize_t Channel::Write(const std::vector<dmcow_reply>& replies) {
  if (replies.empty()) return 0;
  return WriteRaw(replies.data(), replies.size() * sizeof(dmcow_reply));
}

int Channel::Handshake(uint32_t version, dmcow_request* hello_out, int timeout_ms) {
  int r = Poll(timeout_ms);
  if (r <= 0) return r < 0 ? r : -ETIMEDOUT;
  std::vector<dmcow_request> reqs;
  r = Read(&reqs, 1);
  if (r < 0) return r;
  if (r != 1 || reqs[0].kind != DMCOW_REQ_HELLO) return -EPROTO;
  if (hello_out) *hello_out = reqs[0];
  dmcow_reply rep{};
  rep.seq = reqs[0].seq;
  rep.kind = DMCOW_REP_HELLO;
  rep.version = version;
  ssize_t n = Write(rep);
  return n < 0 ? static_cast<int>(n) : 0;
}

Responder::Responder(std::string ident, uint32_t chunk_sectors, uint64_t first_cow_chunk)
    : ident_(std::move(ident)), chunk_sectors_(chunk_sectors), next_cow_chunk_(first_cow_chunk) {}

Responder::~Responder() { Stop(); }

int Responder::Start() {
  int r = chan_.Open(ident_);
  if (r) return r;
  r = chan_.Handshake();
  if (r) {
    chan_.Close();
    return r;
  }
  stop_ = false;
  thread_ = std::thread([this] { Run(); });
  return 0;
}

void Responder::Stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  chan_.Close();
}

void Responder::SetHook(Hook hook) {
  std::lock_guard<std::mutex> l(mu_);
  hook_ = std::move(hook);
}

void Responder::HoldFlushes(bool hold) {
  std::lock_guard<std::mutex> l(mu_);
  hold_flushes_ = hold;
}

void Responder::ReleaseFlushes() {
  std::vector<dmcow_reply> acks;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (uint64_t seq : held_flushes_) acks.push_back(FlushAck(seq));
    held_flushes_.clear();
  }
  ssize_t n = chan_.Write(acks);
  if (n != static_cast<ssize_t>(acks.size() * sizeof(dmcow_reply))) {
    std::lock_guard<std::mutex> l(mu_);
    if (error_.empty()) error_ = "flush ack write: " + std::to_string(n);
  }
}

ssize_t Responder::Send(const dmcow_reply& reply) { return chan_.Write(reply); }

uint64_t Responder::AllocCow(uint64_t nr_chunks) {
  std::lock_guard<std::mutex> l(mu_);
  uint64_t sector = next_cow_chunk_ * chunk_sectors_;
  next_cow_chunk_ += nr_chunks;
  return sector;
}

size_t Responder::Count(uint32_t kind) const {
  std::lock_guard<std::mutex> l(mu_);
  size_t n = 0;
  for (const auto& r : log_) n += r.kind == kind;
  return n;
}

size_t Responder::CountChunk(uint32_t kind, uint64_t chunk) const {
  std::lock_guard<std::mutex> l(mu_);
  size_t n = 0;
  for (const auto& r : log_) n += r.kind == kind && r.chunk == chunk;
  return n;
}

size_t Responder::HeldFlushes() const {
  std::lock_guard<std::mutex> l(mu_);
  return held_flushes_.size();
}

uint64_t Responder::CowOf(uint64_t chunk) const {
  std::lock_guard<std::mutex> l(mu_);
  auto it = rw_.find(chunk);
  return it == rw_.end() ? ~0ULL : it->second;
}

std::vector<dmcow_request> Responder::Log() const {
  std::lock_guard<std::mutex> l(mu_);
  return log_;
}

std::string Responder::Error() const {
  std::lock_guard<std::mutex> l(mu_);
  return error_;
}

void Responder::Handle(const dmcow_request& req, std::vector<dmcow_reply>* out) {
  Hook hook;
  {
    std::lock_guard<std::mutex> l(mu_);
    log_.push_back(req);
    hook = hook_;
  }
  if (hook && hook(req, out)) return;
  switch (req.kind) {
    case DMCOW_REQ_MAP_WRITE: {
      uint64_t sector = AllocCow(1);
      {
        std::lock_guard<std::mutex> l(mu_);
        rw_[req.chunk] = sector;
      }
      out->push_back(MapReply(req.seq, DMCOW_MAP_RW, req.chunk, 1, sector));
      break;
    }
    case DMCOW_REQ_MAP_READ: out->push_back(MapReply(req.seq, DMCOW_MAP_BASE, req.chunk, 1, 0)); break;
    case DMCOW_REQ_FLUSH: {
      std::lock_guard<std::mutex> l(mu_);
      if (hold_flushes_)
        held_flushes_.push_back(req.seq);
      else
        out->push_back(FlushAck(req.seq));
      break;
    }
    default: out->push_back(ErrorReply(req.seq, EINVAL)); break;
  }
}

void Responder::Run() {
  std::vector<dmcow_request> reqs;
  std::vector<dmcow_reply> replies;
  while (!stop_) {
    int r = chan_.Poll(20);
    if (r <= 0) continue;
    r = chan_.Read(&reqs);
    if (r <= 0) continue;
    if (reply_delay_ms_ > 0) std::this_thread::sleep_for(std::chrono::milliseconds(reply_delay_ms_));
    replies.clear();
    for (const auto& req : reqs) Handle(req, &replies);
    ssize_t n = chan_.Write(replies);
    if (n != static_cast<ssize_t>(replies.size() * sizeof(dmcow_reply))) {
      std::lock_guard<std::mutex> l(mu_);
      if (error_.empty()) error_ = "reply write: " + std::to_string(n);
    }
  }
}

}  // namespace dmcow

#ifndef DMCOW_RESPONDER_NO_MAIN

namespace {

volatile sig_atomic_t g_stop = 0;

void OnSignal(int) { g_stop = 1; }

int Usage() {
  std::fprintf(stderr,
               "usage: responder <ident> <chunk_sectors> [--first-cow-chunk N]"
               " [--no-reply] [--flush-delay-ms N]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return Usage();
  std::string ident = argv[1];
  uint32_t chunk_sectors = static_cast<uint32_t>(std::strtoul(argv[2], nullptr, 0));
  uint64_t first = 0;
  bool no_reply = false;
  int flush_delay_ms = 0;
  for (int i = 3; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--first-cow-chunk" && i + 1 < argc) {
      first = std::strtoull(argv[++i], nullptr, 0);
    } else if (a == "--no-reply") {
      no_reply = true;
    } else if (a == "--flush-delay-ms" && i + 1 < argc) {
      flush_delay_ms = std::atoi(argv[++i]);
    } else {
      return Usage();
    }
  }
  if (!chunk_sectors) return Usage();
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);

  if (no_reply) {
    dmcow::Channel chan;
    int r = chan.Open(ident);
    if (!r) r = chan.Handshake();
    if (r) {
      std::fprintf(stderr, "responder: %s\n", std::strerror(-r));
      return 1;
    }
    std::vector<dmcow_request> reqs;
    while (!g_stop)
      if (chan.Poll(100) > 0) chan.Read(&reqs);
    return 0;
  }

  dmcow::Responder resp(ident, chunk_sectors, first);
  if (flush_delay_ms > 0) {
    resp.SetHook([flush_delay_ms](const dmcow_request& req, std::vector<dmcow_reply>*) {
      if (req.kind == DMCOW_REQ_FLUSH) std::this_thread::sleep_for(std::chrono::milliseconds(flush_delay_ms));
      return false;
    });
  }
  int r = resp.Start();
  if (r) {
    std::fprintf(stderr, "responder: %s\n", std::strerror(-r));
    return 1;
  }
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  resp.Stop();
  return resp.Error().empty() ? 0 : 1;
}

#endif  // DMCOW_RESPONDER_NO_MAIN
