#include "daemon.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "dm.h"
#include "log.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

namespace dmcowd {

bool ValidUuid(const std::string& s) {
  if (s.size() > 128) return false;
  for (char c : s) {
    if (!isalnum(static_cast<unsigned char>(c)) && !std::strchr("_.-:+", c)) return false;
  }
  return true;
}

namespace {

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

bool ValidIdent(const std::string& s) {
  if (s.empty() || s.size() > DMCOW_IDENT_MAX || s == "." || s == "..") return false;
  for (char c : s) {
    if (!isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '.' && c != '-') return false;
  }
  return true;
}

// The channel exists only while the table has a cow target, so a device
// whose every chunk could go linear keeps its last chunk in a cow target
// (served from the kernel's store, pushed like any chunk left out).
void KeepOneCowChunk(std::vector<Extent>* linear, uint64_t dev_sectors, uint32_t chunk_sectors) {
  const uint64_t chunks = (dev_sectors + chunk_sectors - 1) / chunk_sectors;
  uint64_t covered = 0;
  for (const Extent& e : *linear) covered += e.nr_chunks;
  if (covered < chunks || linear->empty()) return;
  if (--linear->back().nr_chunks == 0) linear->pop_back();
}

// The first table is kept small so that the device is usable soon: a
// table costs the kernel time per target (0.27 ms each in the test VM).
constexpr uint64_t kFirstTableTargets = 64;

bool HasCow(MapKind k) { return k == MapKind::kRW || k == MapKind::kRO || k == MapKind::kFilledRW; }

// Writes `msgs` in groups of 64; a refused message is an error.
Status SendAll(Channel* chan, const std::vector<dmcow_reply>& msgs, const char* what) {
  for (size_t i = 0; i < msgs.size();) {
    const size_t n = std::min(msgs.size() - i, kMaxBatch);
    ssize_t w = chan->Write(&msgs[i], n);
    if (w < 0) {
      return Status::IOError(chan->path() + ": " + what + " of chunk " + std::to_string(msgs[i].chunk) +
                             " refused: " + std::strerror(static_cast<int>(-w)));
    }
    i += static_cast<size_t>(w) / sizeof(dmcow_reply);
  }
  return Status::OK();
}

// A suspended device holds its I/O: keep trying to resume it for 5 s.
Status ResumeRetrying(const std::string& name, dm::UdevRules rules) {
  Status r = dm::Resume(name, rules);
  for (int i = 0; !r.ok() && i < 50; i++) {
    LOG_ERROR("%s; retrying", r.ToString().c_str());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    r = dm::Resume(name, rules);
  }
  return r;
}

}  // namespace

Daemon::Daemon(DaemonOptions options, std::unique_ptr<Plugin> plugin)
    : options_(std::move(options)), plugin_(std::move(plugin)) {
  if (options_.ident.empty()) options_.ident = options_.name;
  options_.max_targets = std::clamp<uint64_t>(options_.max_targets, 3, kDmMaxTargets);
}

Daemon::~Daemon() { TearDown(); }

Status Daemon::Start() {
  const std::string& name = options_.name;
  if (!ValidIdent(options_.ident)) {
    return Status::InvalidArgument("ident '" + options_.ident +
                                   "': 1-32 characters of A-Z a-z 0-9 _ . - (set it with --ident)");
  }
  if (name.empty() || name.size() > 127 || name.find('/') != std::string::npos) {
    return Status::InvalidArgument("device name '" + name + "' is not valid");
  }
  if (!ValidUuid(options_.uuid)) {
    return Status::InvalidArgument("uuid '" + options_.uuid + "': " + kUuidRule);
  }
  // A dmcowd killed while its device is suspended must not leave the
  // device's I/O held for good. Forked first: the guard keeps a copy of
  // what our memory holds now.
  Status s = guard_.Start(name, options_.uuid, dm::UdevFlags(udev_rules()));
  if (!s.ok()) return s;
  dm::Init();
  if (options_.lock_memory && prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0) {
    LOG_WARN("PR_SET_IO_FLUSHER: %s (memory pressure may deadlock the device)", std::strerror(errno));
  }
  {
    std::lock_guard<std::mutex> l(plugin_mu_);
    s = plugin_->Open(&spec_);
    plugin_open_ = s.ok();
  }
  if (!s.ok()) return s;
  auto fail = [&](Status st) {
    TearDown();
    return st;
  };
  s = base_.Open(spec_.base_path, true);
  if (s.ok()) s = cow_.Open(spec_.cow_path, false);
  if (s.ok() && !spec_.direct_path.empty()) {
    s = direct_.Open(spec_.direct_path, true);  // for its devt
    if (s.ok() && direct_.is_loop())
      s = Status::InvalidArgument(spec_.direct_path + ": direct path is not a block device");
  }
  if (!s.ok()) return fail(s);
  devices_ = TableDevices{options_.ident, base_.devt(), cow_.devt(), spec_.chunk_sectors, spec_.read_to_daemon};
  if (!spec_.direct_path.empty()) {
    devices_.direct = direct_.devt();
    devices_.direct_from = spec_.direct_from_sector;
  }

  if (dm::Exists(name)) return fail(Status::InvalidArgument("device " + name + " exists already"));
  s = dm::Create(name, options_.uuid);
  if (!s.ok()) return fail(s);
  created_ = true;
  s = guard_.Watch();
  if (!s.ok()) return fail(s);

  // The first table: persisted runs go linear, the kernel gets the rest.
  std::vector<Extent> stable;
  std::vector<Mapping> initial;
  {
    std::lock_guard<std::mutex> l(plugin_mu_);
    s = plugin_->ScanStable(&scan_pending_);
    // Without periodic reloads nothing would fold what later slices find:
    // the whole walk now, for one full table.
    while (s.ok() && scan_pending_ && options_.reload_interval_s <= 0) s = plugin_->ScanStable(&scan_pending_);
    if (s.ok()) s = plugin_->StableExtents(&stable);
    if (s.ok()) s = plugin_->InitialMappings(&initial);
    folded_generation_ = plugin_->StableGeneration();
  }
  if (!s.ok()) return fail(s);
  // A scattered image's 60,000 runs would hold up the attach for seconds:
  // chunks left out are pushed to the kernel's store (or asked about at
  // first access), and the first periodic reload folds them in the
  // background, as it folds what the rest of the plugin's scan finds.
  const std::vector<Extent> runs = Coalesce(stable, spec_.chunk_sectors);
  const uint64_t first_targets = options_.reload_interval_s > 0
                                     ? std::min<uint64_t>(options_.max_targets, kFirstTableTargets)
                                     : options_.max_targets;
  std::vector<Extent> linear = ChooseLinear(runs, first_targets);
  if (linear.size() < runs.size() && first_targets < options_.max_targets) folded_generation_ = ~uint64_t{0};
  KeepOneCowChunk(&linear, spec_.sectors, spec_.chunk_sectors);
  s = LoadTable(linear);
  if (!s.ok()) return fail(s);

  dmcow_request hello;
  s = chan_.Open(options_.ident, 10000);
  if (s.ok()) s = chan_.Handshake(spec_, 5000, &hello);
  if (!s.ok()) return fail(s);

  std::vector<dmcow_reply> push;
  for (const Mapping& m : initial) {
    for (const Extent& e : Subtract({Extent{m.chunk, m.nr_chunks, m.cow_sector}}, linear, spec_.chunk_sectors)) {
      push.push_back(MakePush(Mapping{m.kind, e.chunk, e.nr_chunks, HasCow(m.kind) ? e.cow_sector : 0}));
    }
  }
  s = SendAll(&chan_, push, "initial mapping");
  if (s.ok()) s = dm::Resume(name, udev_rules(), &udev_cookie_);
  if (!s.ok()) return fail(s);
  linear_ = linear;
  // The table holds the devices now; the loops go away with it.
  base_.Release();
  cow_.Release();
  direct_.Release();

  if (options_.lock_memory && mlockall(MCL_CURRENT | MCL_FUTURE) != 0) {
    LOG_WARN("mlockall: %s (the daemon may be paged out under memory pressure)", std::strerror(errno));
  }
  reclaim_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  server_ = std::make_unique<Server>(&chan_, plugin_.get(), &plugin_mu_, reclaim_fd_);
  server_done_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  server_thread_ = std::thread([this] {
    Status r = server_->Run(&chan_);
    if (!r.ok()) LOG_ERROR("serving stopped: %s", r.ToString().c_str());
    const uint64_t one = 1;
    ssize_t ignored = ::write(server_done_fd_, &one, sizeof(one));
    (void)ignored;
  });
  LOG_INFO("/dev/mapper/%s ready: %llu sectors, chunks of %u sectors, %zu mapping runs pushed, %zu linear runs",
           name.c_str(), static_cast<unsigned long long>(spec_.sectors), spec_.chunk_sectors, push.size(),
           linear.size());
  return Status::OK();
}

Status Daemon::LoadTable(const std::vector<Extent>& linear) {
  std::vector<Segment> segments = BuildSegments(linear, spec_.sectors, spec_.chunk_sectors);
  reload_stats_.targets = segments.size();
  uint64_t chunks = 0;
  for (const Extent& e : linear) chunks += e.nr_chunks;
  reload_stats_.linear_chunks = chunks;
  return dm::Load(options_.name, segments, devices_);
}

// A flush of our own device waits for our own answer. Issued by a thread
// of ours, a SIGKILL meanwhile leaves that thread in uninterruptible sleep
// for an answer no one sends; the channel is released only when every
// thread has gone, so the process never dies and the device is stuck
// (seen: daemon_killed_repeatedly, the daemon alive 5 s after SIGKILL).
// A child that holds none of our descriptors flushes instead: if we die,
// the channel's release fails its flush and it exits.
Status Daemon::FlushDevice() {
  const std::string node = "/dev/mapper/" + options_.name;
  const pid_t pid = ::fork();
  if (pid < 0) return Status::IOError(node + ": flush: fork: " + std::strerror(errno));
  if (pid == 0) {  // only async-signal-safe calls from here
    ::close_range(3, ~0U, 0);
    const int fd = ::open(node.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) ::_exit(100 + (errno & 0x3f));
    ::_exit(::fdatasync(fd) == 0 ? 0 : 1 + (errno & 0x3f));
  }
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0) {
    if (errno != EINTR) return Status::IOError(node + ": flush: waitpid: " + std::strerror(errno));
  }
  if (!WIFEXITED(st)) return Status::IOError(node + ": flush: the flushing process died");
  const int code = WEXITSTATUS(st);
  if (code == 0) return Status::OK();
  if (code >= 100) return Status::IOError(node + ": open: " + std::strerror(code - 100));
  return Status::IOError(node + ": flush: " + std::strerror(code - 1));
}

bool Daemon::ScanSlice() {
  const auto t0 = Clock::now();
  Status s;
  {
    std::lock_guard<std::mutex> l(plugin_mu_);
    s = plugin_->ScanStable(&scan_pending_);
  }
  if (!s.ok()) {
    // Folding is an optimisation: the device serves every chunk without it.
    LOG_ERROR("scan for stable extents: %s (chunks not found stay in the kernel's store)", s.ToString().c_str());
    scan_pending_ = false;
    return false;
  }
  if (scan_pending_) return false;
  LOG_INFO("scan for stable extents done (last slice %.1f ms)", MsSince(t0));
  return true;
}

Status Daemon::Reload() {
  const auto t0 = Clock::now();
  // One FLUSH round trip makes every mapping handed out so far durable.
  Status s = FlushDevice();
  if (!s.ok()) return s;
  std::vector<Extent> stable;
  uint64_t generation;
  {
    std::lock_guard<std::mutex> l(plugin_mu_);
    generation = plugin_->StableGeneration();
    if (generation == folded_generation_) return Status::OK();
    s = plugin_->StableExtents(&stable);
  }
  if (!s.ok()) return s;
  const uint32_t cs = spec_.chunk_sectors;
  std::vector<Extent> linear = ChooseLinear(Coalesce(stable, cs), options_.max_targets);
  KeepOneCowChunk(&linear, spec_.sectors, cs);

  // Chunks that leave linear segments go back to the kernel's store first,
  // while the live table still routes them linearly. After the load: the
  // kernel accepts chunks up to the end of its last cow target, and only
  // the new table's cow targets may reach that far.
  DMCOW_RETURN_IF_ERROR(LoadTable(linear));
  std::vector<dmcow_reply> msgs;
  for (const Extent& e : Subtract(linear_, linear, cs)) {
    msgs.push_back(MakePush(Mapping{MapKind::kFilledRW, e.chunk, e.nr_chunks, e.cow_sector}));
  }
  DMCOW_RETURN_IF_ERROR(SendAll(&chan_, msgs, "push"));

  msgs.clear();
  for (const Extent& e : Subtract(linear, linear_, cs)) msgs.push_back(MakeInvalidate(e.chunk, e.nr_chunks));
  const auto ts = Clock::now();
  DMCOW_RETURN_IF_ERROR(dm::Suspend(options_.name));
  // I/O is quiesced: the kernel may forget what linear segments now serve.
  s = SendAll(&chan_, msgs, "invalidate");
  if (!s.ok()) LOG_WARN("%s (the kernel keeps those mappings; harmless)", s.ToString().c_str());
  DMCOW_RETURN_IF_ERROR(ResumeRetrying(options_.name, udev_rules()));
  reload_stats_.last_suspended_ms = MsSince(ts);
  linear_ = std::move(linear);
  folded_generation_ = generation;
  reload_stats_.reloads++;
  reload_stats_.last_ms = MsSince(t0);
  LOG_INFO("reload: %llu targets, %llu chunks linear, %zu invalidated; %.1f ms (suspended %.1f ms)",
           static_cast<unsigned long long>(reload_stats_.targets),
           static_cast<unsigned long long>(reload_stats_.linear_chunks), msgs.size(), reload_stats_.last_ms,
           reload_stats_.last_suspended_ms);
  return Status::OK();
}

Status Daemon::Reclaim() {
  {
    std::lock_guard<std::mutex> l(plugin_mu_);
    if (!plugin_->WantsReclaim()) return Status::OK();
  }
  const auto t0 = Clock::now();
  // Suspended, no I/O is in flight, so nothing still reads the places the
  // kernel is about to forget; and with the serving mutex held every request
  // read so far is answered, so no reply naming an old place is still to come.
  DMCOW_RETURN_IF_ERROR(dm::Suspend(options_.name));
  Status s;
  size_t extents = 0, refused = 0;
  {
    std::lock_guard<std::mutex> serving(server_->serving_mutex());
    std::lock_guard<std::mutex> l(plugin_mu_);
    std::vector<Extent> forget;
    s = plugin_->Reclaim(&forget);
    // One message at a time: the plugin learns which the kernel took (a
    // chunk whose kernel fill still reads the old place answers EBUSY).
    std::vector<int> errors;
    for (size_t i = 0; s.ok() && i < forget.size(); i++) {
      const dmcow_reply msg = MakeInvalidate(forget[i].chunk, forget[i].nr_chunks);
      const ssize_t w = chan_.Write(&msg, 1);
      errors.push_back(w == static_cast<ssize_t>(sizeof(msg)) ? 0 : w < 0 ? static_cast<int>(-w) : EIO);
      if (errors.back() != 0) {
        refused++;
        LOG_DEBUG("reclaim: chunk %llu: %s", static_cast<unsigned long long>(forget[i].chunk),
                  std::strerror(errors.back()));
      }
    }
    plugin_->Reclaimed(errors);
    extents = forget.size();
  }
  DMCOW_RETURN_IF_ERROR(ResumeRetrying(options_.name, udev_rules()));
  if (!s.ok()) return s;
  LOG_INFO("reclaim: %zu extents forgotten, %zu refused (kept for the next); %.1f ms", extents - refused, refused,
           MsSince(t0));
  return Status::OK();
}

Status Daemon::Shutdown(bool* busy) {
  *busy = false;
  Status s = FlushDevice();
  if (!s.ok()) LOG_WARN("final flush: %s", s.ToString().c_str());
  if (created_) {
    for (int i = 0; i < 20; i++) {
      s = dm::Remove(options_.name, busy);
      if (!*busy) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (*busy) return s;
    if (!s.ok()) return s;
    created_ = false;
  }
  StopServing();
  chan_.Close();
  if (plugin_open_) {
    std::lock_guard<std::mutex> l(plugin_mu_);
    s = plugin_->Close();
    plugin_open_ = false;
  }
  return s;
}

void Daemon::StopServing() {
  if (server_) server_->Stop();
  if (server_thread_.joinable()) server_thread_.join();
  if (server_) {
    const ServerStats& st = server_->stats();
    LOG_INFO(
        "served %llu batches: %llu map requests (%.1f ms in the plugin), %llu flushes, %llu errors, %llu refused "
        "replies",
        static_cast<unsigned long long>(st.batches.load()), static_cast<unsigned long long>(st.maps.load()),
        static_cast<double>(st.map_ns.load()) / 1e6, static_cast<unsigned long long>(st.flushes.load()),
        static_cast<unsigned long long>(st.errors.load()), static_cast<unsigned long long>(st.refused.load()));
  }
  server_.reset();
  if (server_done_fd_ >= 0) ::close(server_done_fd_);
  server_done_fd_ = -1;
  if (reclaim_fd_ >= 0) ::close(reclaim_fd_);
  reclaim_fd_ = -1;
}

void Daemon::TearDown() {
  StopServing();
  chan_.Close();
  if (created_) {
    bool busy = false;
    Status s = dm::Remove(options_.name, &busy);
    if (!s.ok()) LOG_ERROR("%s", s.ToString().c_str());
    created_ = false;
  }
  guard_.Stop();
  base_.Release();
  cow_.Release();
  direct_.Release();
  if (plugin_open_) {
    std::lock_guard<std::mutex> l(plugin_mu_);
    Status s = plugin_->Close();
    if (!s.ok()) LOG_ERROR("%s", s.ToString().c_str());
    plugin_open_ = false;
  }
}

int Daemon::Run() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  int sfd = signalfd(-1, &set, SFD_CLOEXEC);
  if (sfd < 0) {
    LOG_ERROR("signalfd: %s", std::strerror(errno));
    return 1;
  }
  const bool reloads = options_.reload_interval_s > 0;
  const auto interval = std::chrono::seconds(reloads ? options_.reload_interval_s : 0);
  auto next_reload = Clock::now() + interval;  // a deadline: reclaim wakeups must not postpone it
  auto next_reclaim = Clock::now();            // after a failed reclaim, wait a while
  int code = 0;
  for (;;) {
    int timeout = -1;
    if (reloads) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(next_reload - Clock::now()).count();
      timeout = static_cast<int>(std::clamp<int64_t>(left, 0, INT32_MAX));
      // The plugin's scan goes on in slices, with a pause between them in
      // which requests take the plugin first; its end is folded at once.
      if (scan_pending_) timeout = std::min(timeout, 10);
    }
    pollfd p[3] = {{sfd, POLLIN, 0}, {server_done_fd_, POLLIN, 0}, {reclaim_fd_, POLLIN, 0}};
    int r = ::poll(p, 3, timeout);
    if (r < 0 && errno == EINTR) continue;
    if (reloads && scan_pending_ && !p[1].revents && ScanSlice()) next_reload = Clock::now();
    if (reloads && Clock::now() >= next_reload && !p[1].revents) {
      Status s = Reload();
      if (!s.ok()) LOG_ERROR("reload: %s", s.ToString().c_str());
      next_reload = Clock::now() + interval;
    }
    if (r <= 0) continue;
    if (p[2].revents && !p[1].revents) {
      uint64_t n;
      ssize_t ignored = ::read(reclaim_fd_, &n, sizeof(n));
      (void)ignored;
      if (Clock::now() >= next_reclaim) {
        Status s = Reclaim();
        if (!s.ok()) {
          LOG_ERROR("reclaim: %s (next try in a second)", s.ToString().c_str());
          next_reclaim = Clock::now() + std::chrono::seconds(1);
        }
      }
      if (!(p[0].revents & POLLIN)) continue;
    }
    if (p[1].revents) {
      LOG_ERROR("the channel failed; removing the device");
      code = 1;
      bool busy;
      Status s = Shutdown(&busy);
      if (!s.ok()) LOG_ERROR("%s", s.ToString().c_str());
      break;
    }
    signalfd_siginfo si;
    if (::read(sfd, &si, sizeof(si)) != sizeof(si)) continue;
    if (si.ssi_signo == SIGHUP) {
      Status s = Reload();
      if (!s.ok()) LOG_ERROR("reload: %s", s.ToString().c_str());
      continue;
    }
    LOG_INFO("%s: flushing and removing /dev/mapper/%s", strsignal(static_cast<int>(si.ssi_signo)),
             options_.name.c_str());
    bool busy = false;
    Status s = Shutdown(&busy);
    if (busy) {
      LOG_WARN("/dev/mapper/%s is in use; still serving (signal again to retry)", options_.name.c_str());
      continue;
    }
    if (!s.ok()) {
      LOG_ERROR("%s", s.ToString().c_str());
      code = 1;
    }
    break;
  }
  ::close(sfd);
  return code;
}

}  // namespace dmcowd
