// The `qcow2` plugin: a qcow2 (or legacy qcow v1) image as a block device
// whose writes land in the image with the metadata QEMU expects (decisions:
// qcow2_mapper.h; the engine's side: qcow/src/qcow2/qcow2_device.cc,
// qcow/src/qcow1/qcow1_device.cc).
//
//   dmcowd --plugin qcow2 --name NAME [--opt KEY=VALUE ...] IMAGE
//
// Files (daemon/src/chain_files.h): every file of the chain is opened once.
// dmcow-qcow attach opens them and passes the descriptors (inherited):
// image_fd=N is the image (IMAGE is then only its name: for messages and
// for resolving its backing names, as the engine does), chainK=FD:NAME the
// K-th file below it (K = 1, 2...), under the name the engine resolves for
// it. The engine reads through those descriptors (an FdEnv: no path is
// opened), the loop device is set up on the image's descriptor, and the
// QEMU lock is taken on that same open file description: the loop keeps it
// (and so the lock) for as long as the device exists, even if this process
// is killed. Without image_fd, the plugin opens IMAGE and its chain itself,
// the same way and once.
//
// Settings:
//   read_only=1      never write the image (writes fail with EROFS); nothing
//                    is opened for writing
//   image_fd=N, chainK=FD:NAME   the chain, opened by the caller (above)
//   no_backing=1     the image alone: unallocated clusters read zeros (and
//                    a write around them fills zeros, not backing data)
//   backing=DEV      block device holding the backing chain's content
//                    (dmcow-qcow attaches qcow2/qcow backings read-only and
//                    passes their device); a raw backing file at the bottom
//                    of the chain is the base when this is not given
//   name=PREFIX      names of the helper devices (default dmcowq<pid>)
//   scratch_dir=DIR  where the unlinked scratch file lives (default: the
//                    image's directory, else /var/tmp; else memory)
//   scratch_max=BYTES  the scratch file's budget (default 1 GiB; 0: none):
//                    past it the oldest copies are reclaimed (qcow2_mapper.h)
//   secretK=FD       the passphrase of an encrypted layer (K = 0: the image,
//                    K = 1, 2...: the K-th file below it), read from the
//                    inherited descriptor FD to its end (at most 64 KiB) and
//                    wiped once the chain is open
//
// Encrypted images (LUKS; legacy AES is refused: its IV is the guest
// sector): the kernel does the cryptography. The image's loop device gets
// a dm-crypt device, PREFIX-crypt, with the master key (through the kernel
// keyring: dm_crypt.h) and IV = host sector, and everything that reached
// the image's loop goes through it instead: kernel reads and writes of
// allocated clusters, and new clusters the kernel fills. The engine
// encrypts what the daemon writes itself (cluster fills) with the same key
// and IVs. Scratch then holds plaintext, so it lives in memory (memfd),
// never in a file on disk.
//
// Devices (all removed at Close; loops vanish with them):
//   PREFIX-store  the cow device: [scratch file | image file] (dm-linear);
//                 the image part grows with the file
//   PREFIX-base   what unallocated chunks read: the backing content, zeros
//                 past its end or without one (dm-linear + dm-zero)
//   PREFIX-crypt  encrypted images: the image's loop through dm-crypt
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>

#include "attach_keys.h"
#include "chain_files.h"
#include "dm.h"
#include "dm_crypt.h"
#include "dmcow/device_image.h"
#include "dmcow/image_lock.h"
#include "log.h"
#include "loopdev.h"
#include "plugins.h"
#include "qcow2/qcow2_mapper.h"
#include "sys_error.h"

namespace dmcowd {

namespace {

using dmcow::Image;

std::string DirOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

class Qcow2Plugin final : public Plugin, public CowSpace {
 public:
  explicit Qcow2Plugin(const PluginOptions& options) : options_(options) {
    auto get = [&](const char* key) {
      auto it = options.params.find(key);
      return it == options.params.end() ? std::string() : it->second;
    };
    read_only_ = get("read_only") == "1";
    no_backing_ = get("no_backing") == "1";
    image_fd_param_ = get("image_fd");
    backing_ = get("backing");
    prefix_ = get("name").empty() ? "dmcowq" + std::to_string(::getpid()) : get("name");
    scratch_dir_ = get("scratch_dir");
    if (!get("scratch_max").empty()) scratch_max_ = std::stoull(get("scratch_max"));  // checked by MakeQcow2Plugin
    for (const auto& [key, value] : options.params) {
      if (key.compare(0, 6, "secret") == 0) secret_fds_[std::stoul(key.substr(6))] = std::stoi(value);  // checked
    }
  }
  ~Qcow2Plugin() override { (void)Close(); }

  Status Open(DeviceSpec* spec) override {
    const std::string& path = options_.args[0];
    DMCOW_RETURN_IF_ERROR(TakeFiles(path));
    const int fd = files_.Fd(path);
    // QEMU's image locks, on the open file description the loop device will
    // hold: a running QEMU that writes the image refuses us, and QEMU refuses
    // an image we serve, until the device is gone (dmcow/image_lock.h).
    using Mode = dmcow::ImageLock::Mode;
    DMCOW_RETURN_IF_ERROR(
        dmcow::ImageLock::AcquireFd(fd, path, read_only_ ? Mode::kReadOnly : Mode::kReadWrite, &lock_));
    dmcow::OpenOptions o;
    o.writable = !read_only_;
    o.env = &files_;  // the engine opens nothing by name
    o.open_backing = !no_backing_;
    std::vector<std::string> secrets;
    DMCOW_RETURN_IF_ERROR(ReadSecrets(&secrets));
    for (const std::string& secret : secrets) o.layer_secrets.push_back(secret.empty() ? nullptr : &secret);
    Status opened = dmcow::OpenImage(path, o, &image_);
    WipeSecrets(&secrets);  // the engine keeps the master keys, not the passphrases
    if (const std::string layer = dmcow::LayerMissingKey(opened); !layer.empty()) {
      return Status::InvalidArgument(layer + ": image is encrypted and no passphrase was given for it");
    }
    DMCOW_RETURN_IF_ERROR(opened);
    const dmcow::ImageInfo& info = image_->info();
    device_ = image_->AsDeviceImage();  // qcow2 and qcow v1 have the serving calls, raw has none
    if (device_ == nullptr && info.encryption.format == "aes") {
      return Status::NotSupported(path + kLegacyAesRefusal);
    }
    encrypted_ = info.encrypted;
    if (device_ == nullptr) {
      return Status::NotSupported(path + ": is " + info.format +
                                  "; attach serves qcow2 and qcow images (convert it first)");
    }
    if (!info.data_file.empty())
      return Status::NotSupported(path + ": external data files are not supported by attach");
    const bool has_backing = !no_backing_ && !info.backing_filename.empty();
    int backing_fd = -1;
    if (has_backing && backing_.empty()) {
      if (image_->backing() == nullptr || image_->backing()->info().format != "raw") {
        return Status::InvalidArgument(path + ": its backing file " + info.backing_filename +
                                       " is not raw: attach it first and pass its device (--opt backing=DEV);"
                                       " dmcow-qcow attach does this");
      }
      backing_label_ = image_->backing()->filename();
      backing_fd = files_.Fd(backing_label_);
      if (backing_fd < 0) return Status::InvalidArgument(backing_label_ + ": not opened for this image");
      DMCOW_RETURN_IF_ERROR(dmcow::ImageLock::AcquireFd(backing_fd, backing_label_, Mode::kReadOnly, &backing_lock_));
    } else if (has_backing) {
      backing_label_ = backing_;
    }
    mapper_ = std::make_unique<Qcow2Mapper>(image_.get(), this, !read_only_, has_backing);
    mapper_->SetScratchBudget(scratch_max_);
    const Qcow2Geometry& geo = mapper_->geometry();
    const uint64_t dev_sectors = (image_->virtual_size() + 511) / 512;

    // The image file on a loop device, over the descriptor the engine and
    // the lock use.
    image_fd_ = fd;
    struct stat st;
    if (::fstat(fd, &st) != 0) return Errno(path + ": stat", errno);
    original_size_ = static_cast<uint64_t>(st.st_size);
    // An image on a block device (a disk, a partition): st_size is 0 there;
    // the store must reach the whole device.
    if (S_ISBLK(st.st_mode) && ::ioctl(fd, BLKGETSIZE64, &original_size_) != 0) return Errno(path + ": size", errno);
    image_bytes_ = original_size_ & ~uint64_t{511};
    DMCOW_RETURN_IF_ERROR(image_loop_.OpenFile(fd, path, read_only_));
    if (encrypted_) {
      dm::Init();
      DMCOW_RETURN_IF_ERROR(CreateCryptDevice());
    }

    // The scratch file: sparse, unlinked, never on the device we serve.
    DMCOW_RETURN_IF_ERROR(OpenScratch(path, geo.scratch_sectors * 512));
    DMCOW_RETURN_IF_ERROR(scratch_loop_.OpenFile(scratch_fd_, "scratch of " + path, false));
    scratch_loop_devt_ = scratch_loop_.devt();

    dm::Init();
    DMCOW_RETURN_IF_ERROR(CreateDevice(store_name(), StoreTable()));
    store_created_ = true;
    std::vector<dm::Target> base;
    uint64_t backing_sectors = 0;
    if (has_backing) {
      // The level below's device (ours, made by dmcow-qcow), or the raw
      // bottom of the chain on a loop over its open descriptor.
      if (backing_fd >= 0)
        DMCOW_RETURN_IF_ERROR(backing_dev_.Adopt(backing_fd, backing_label_, true));
      else
        DMCOW_RETURN_IF_ERROR(backing_dev_.Open(backing_, true));
      uint64_t bytes = 0;
      if (::ioctl(backing_dev_.fd(), BLKGETSIZE64, &bytes) != 0) return Errno(backing_label_ + ": size", errno);
      backing_sectors = std::min(bytes / 512, dev_sectors);
      if (backing_sectors > 0) base.push_back(dm::Target{0, backing_sectors, "linear", backing_dev_.devt() + " 0"});
    }
    if (backing_sectors < dev_sectors) {
      base.push_back(dm::Target{backing_sectors, dev_sectors - backing_sectors, "zero", ""});
    }
    DMCOW_RETURN_IF_ERROR(CreateDevice(base_name(), base));
    base_created_ = true;
    backing_dev_.Release();
    scratch_loop_.Release();

    DMCOW_RETURN_IF_ERROR(mapper_->Init());
    spec->base_path = "/dev/mapper/" + base_name();
    spec->cow_path = "/dev/mapper/" + store_name();
    spec->sectors = dev_sectors;
    spec->chunk_sectors = geo.chunk_sectors;
    spec->read_to_daemon = true;
    // Folded clusters skip the store: linear segments go to the image's loop
    // (through dm-crypt for an encrypted image).
    spec->direct_path = encrypted_ ? "/dev/mapper/" + crypt_name() : image_loop_.devnode();
    spec->direct_from_sector = geo.scratch_sectors;
    LOG_INFO("%s: %s v%u, %llu-byte clusters, %s%s, chunks of %u sectors", path.c_str(), info.format.c_str(),
             info.version, static_cast<unsigned long long>(info.cluster_size), read_only_ ? "read-only" : "read-write",
             has_backing ? (", backing " + backing_label_).c_str() : "", geo.chunk_sectors);
    return Status::OK();
  }

  // Nothing needs pushing: with read_to_daemon, a chunk the first table
  // leaves out is asked about at its first access and Map answers it from
  // the image (FILLED_RW for clusters writable in place). Pushing every such
  // chunk of a scattered image made the attach wait for tens of thousands of
  // messages.
  Status InitialMappings(std::vector<Mapping>* out) override {
    out->clear();
    return Status::OK();
  }

  Status Map(const MapRequest& req, Answer* answer) override { return mapper_->Map(req, answer); }
  void Retract(const MapRequest& req, const Mapping& mapping) override { mapper_->Retract(req, mapping); }
  Status Flush(uint64_t durable_batch) override { return mapper_->Flush(durable_batch); }
  Status StableExtents(std::vector<Extent>* out) override { return mapper_->StableExtents(out); }
  // 1,024 data chunks a call: about a millisecond natively, so a scattered image's
  // attach and the requests waiting behind a call are not held up.
  Status ScanStable(bool* more) override { return mapper_->ScanStable(1024, more); }
  uint64_t StableGeneration() const override { return mapper_ ? mapper_->stable_generation() : 0; }
  bool WantsReclaim() const override { return mapper_ && mapper_->WantsReclaim(); }
  Status Reclaim(std::vector<Extent>* forget) override {
    mapper_->Reclaim(forget);
    return Status::OK();
  }
  void Reclaimed(const std::vector<int>& errors) override { mapper_->Reclaimed(errors); }

  Status Close() override {
    Status result;
    if (image_) {
      result = image_->Flush();
      const uint64_t cs = image_->info().cluster_size;
      const uint64_t end = device_ != nullptr ? device_->AllocationEnd() : 0;
      device_ = nullptr;
      image_.reset();  // closing clears a lazy-refcount dirty bit
      // Give back the room grown ahead of allocations: the file ends where
      // its last cluster does, or where it ended before.
      const uint64_t rounded = (original_size_ + cs - 1) / cs * cs;
      const uint64_t final_size = end > rounded ? end : original_size_;
      struct stat st;
      if (!read_only_ && image_fd_ >= 0 && ::fstat(image_fd_, &st) == 0 &&
          static_cast<uint64_t>(st.st_size) > final_size &&
          ::ftruncate(image_fd_, static_cast<off_t>(final_size)) != 0) {
        if (result.ok()) result = Errno(options_.args[0] + ": truncate", errno);
      }
    }
    mapper_.reset();
    bool busy = false;
    if (base_created_) {
      Status s = dm::Remove(base_name(), &busy);
      if (!s.ok()) LOG_ERROR("%s", s.ToString().c_str());
      base_created_ = false;
    }
    if (store_created_) {
      Status s = dm::Remove(store_name(), &busy);
      if (!s.ok()) LOG_ERROR("%s", s.ToString().c_str());
      store_created_ = false;
    }
    if (crypt_created_) {  // after the store, which maps onto it
      Status s = dm::Remove(crypt_name(), &busy);
      if (!s.ok()) LOG_ERROR("%s", s.ToString().c_str());
      crypt_created_ = false;
    }
    image_loop_.Release();
    scratch_loop_.Release();
    backing_dev_.Release();
    if (scratch_fd_ >= 0) ::close(scratch_fd_);
    image_fd_ = scratch_fd_ = -1;
    lock_.reset();
    backing_lock_.reset();
    files_.Clear();  // closes the chain's descriptors (image_fd_ among them)
    return result;
  }

 private:
  std::string store_name() const { return prefix_ + "-store"; }
  std::string base_name() const { return prefix_ + "-base"; }
  std::string crypt_name() const { return prefix_ + "-crypt"; }
  // What the store's image part and linear segments map onto.
  const std::string& image_devt() const { return encrypted_ ? crypt_devt_ : image_loop_.devt(); }

  // The passphrases of secretK=FD, by chain depth ("" for a layer given
  // none); each descriptor read to its end and closed.
  Status ReadSecrets(std::vector<std::string>* out) {
    for (auto& [depth, fd] : secret_fds_) {
      if (out->size() <= depth) out->resize(depth + 1);
      const std::string what = "secret" + std::to_string(depth) + "=" + std::to_string(fd);
      Status s = ReadPassphrase(fd, what, &(*out)[depth]);
      ::close(fd);
      fd = -1;
      if (s.ok() && (*out)[depth].empty()) s = Status::InvalidArgument(what + ": an empty passphrase");
      if (!s.ok()) {
        WipeSecrets(out);
        return s;
      }
    }
    return Status::OK();
  }
  static void WipeSecrets(std::vector<std::string>* secrets) {
    for (std::string& s : *secrets) WipePassphrase(&s);
    secrets->clear();
  }

  // PREFIX-crypt over the image's loop, as long as the image part of the
  // store (EnsureImageBytes grows both).
  Status LoadCryptTable() {
    return device_->WithKernelCipher([&](const std::string& cipher, const uint8_t* key, size_t len) {
      return dm::LoadCrypt(crypt_name(), dm::CryptTable{cipher, key, len, image_loop_.devt(), image_bytes_ / 512});
    });
  }
  Status CreateCryptDevice() {
    if (image_bytes_ < 512) return Status::InvalidArgument(options_.args[0] + ": an encrypted image of no sectors");
    if (dm::Exists(crypt_name())) return Status::InvalidArgument("device " + crypt_name() + " exists already");
    DMCOW_RETURN_IF_ERROR(dm::Create(crypt_name()));
    crypt_created_ = true;  // Close removes it
    DMCOW_RETURN_IF_ERROR(LoadCryptTable());
    DMCOW_RETURN_IF_ERROR(dm::Resume(crypt_name(), dm::UdevRules::kNoDisk));
    struct stat st;
    const std::string node = "/dev/mapper/" + crypt_name();
    if (::stat(node.c_str(), &st) != 0) return Errno(node, errno);
    crypt_devt_ = std::to_string(major(st.st_rdev)) + ":" + std::to_string(minor(st.st_rdev));
    LOG_INFO("%s: encrypted; the kernel's dm-crypt does the cryptography (%s)", options_.args[0].c_str(), node.c_str());
    return Status::OK();
  }

  std::vector<dm::Target> StoreTable() const {
    const uint64_t scratch = mapper_->geometry().scratch_sectors;
    std::vector<dm::Target> t{dm::Target{0, scratch, "linear", scratch_loop_devt_ + " 0"}};
    if (image_bytes_ >= 512) t.push_back(dm::Target{scratch, image_bytes_ / 512, "linear", image_devt() + " 0"});
    return t;
  }

  // The chain's files into files_: the descriptors the caller passed
  // (image_fd, chainK), or, without them, IMAGE and its chain opened here
  // (once each, as dmcow-qcow attach opens them).
  Status TakeFiles(const std::string& path) {
    if (image_fd_param_.empty()) {
      ChainPolicy policy;
      policy.writable = !read_only_;
      policy.follow_backing = !no_backing_;
      std::vector<ChainFile> chain;
      DMCOW_RETURN_IF_ERROR(OpenChain(path, policy, &chain));
      for (ChainFile& f : chain) files_.Add(f.name, std::move(f.fd));
      return Status::OK();
    }
    auto adopt = [&](const std::string& what, const std::string& number, const std::string& name) {
      const int fd = std::stoi(number);  // digits, checked by MakeQcow2Plugin
      const int fl = ::fcntl(fd, F_GETFL);
      if (fl < 0) return Status::InvalidArgument(what + "=" + number + ": not an open descriptor");
      if (!read_only_ && what == "image_fd" && (fl & O_ACCMODE) != O_RDWR) {
        return Status::InvalidArgument(name + ": image_fd " + number + " is not open for writing (read_only=1?)");
      }
      ::fcntl(fd, F_SETFD, FD_CLOEXEC);
      files_.Add(name, UniqueFd(fd));
      return Status::OK();
    };
    DMCOW_RETURN_IF_ERROR(adopt("image_fd", image_fd_param_, path));
    for (int k = 1;; k++) {
      auto it = options_.params.find("chain" + std::to_string(k));
      if (it == options_.params.end()) break;
      const size_t colon = it->second.find(':');
      DMCOW_RETURN_IF_ERROR(adopt(it->first, it->second.substr(0, colon), it->second.substr(colon + 1)));
    }
    return Status::OK();
  }

  Status CreateDevice(const std::string& name, const std::vector<dm::Target>& table) {
    if (dm::Exists(name)) return Status::InvalidArgument("device " + name + " exists already");
    DMCOW_RETURN_IF_ERROR(dm::Create(name));
    Status s = dm::LoadTargets(name, table);
    if (s.ok()) s = dm::Resume(name, dm::UdevRules::kNoDisk);
    if (!s.ok()) {
      bool busy;
      (void)dm::Remove(name, &busy);
    }
    return s;
  }

  Status OpenScratch(const std::string& image_path, uint64_t bytes) {
    std::vector<std::string> dirs;
    if (encrypted_)
      ;  // plaintext: memory only (below)
    else if (!scratch_dir_.empty())
      dirs.push_back(scratch_dir_);
    else
      dirs = {DirOf(image_path), "/var/tmp"};
    for (const std::string& dir : dirs) {
      scratch_fd_ = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
      if (scratch_fd_ >= 0) break;
      LOG_DEBUG("scratch in %s: %s", dir.c_str(), std::strerror(errno));
    }
    if (scratch_fd_ < 0 && (scratch_dir_.empty() || encrypted_))
      scratch_fd_ = ::memfd_create("dmcow-scratch", MFD_CLOEXEC);
    if (scratch_fd_ < 0) return Errno("scratch file" + (scratch_dir_.empty() ? "" : " in " + scratch_dir_), errno);
    if (::ftruncate(scratch_fd_, static_cast<off_t>(bytes)) != 0) return Errno("scratch file: size", errno);
    // The loop takes its own reference; keep ours for WriteScratch.
    return Status::OK();
  }

  // CowSpace.
  Status WriteScratch(uint64_t offset, const void* buf, size_t len) override {
    const auto* p = static_cast<const uint8_t*>(buf);
    while (len > 0) {  // runs reach 2 MiB: a short write is legal
      const ssize_t w = ::pwrite(scratch_fd_, p, len, static_cast<off_t>(offset));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return Errno("scratch file: write", w < 0 ? errno : EIO);
      p += w;
      offset += static_cast<uint64_t>(w);
      len -= static_cast<size_t>(w);
    }
    return Status::OK();
  }

  Status ReleaseScratch(uint64_t offset, uint64_t len) override {
    if (::fallocate(scratch_fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                    static_cast<off_t>(len)) != 0) {
      return Errno("scratch file: punch", errno);
    }
    return Status::OK();
  }

  Status EnsureImageBytes(uint64_t end) override {
    if (end <= image_bytes_) return Status::OK();
    // Grow ahead, so that this happens once per many allocations.
    const uint64_t step = std::max<uint64_t>(64 << 20, end / 8);
    const uint64_t target = (end + step + (1 << 20) - 1) & ~uint64_t{(1 << 20) - 1};
    struct stat st;
    if (::fstat(image_fd_, &st) != 0) return Errno(options_.args[0] + ": stat", errno);
    if (static_cast<uint64_t>(st.st_size) < target && ::ftruncate(image_fd_, static_cast<off_t>(target)) != 0) {
      return Errno(options_.args[0] + ": extend", errno);
    }
    DMCOW_RETURN_IF_ERROR(image_loop_.SetCapacity());
    image_bytes_ = target;
    if (encrypted_) {  // the crypt device first: the store's new table reaches its new end
      DMCOW_RETURN_IF_ERROR(LoadCryptTable());
      DMCOW_RETURN_IF_ERROR(dm::Suspend(crypt_name()));
      DMCOW_RETURN_IF_ERROR(dm::Resume(crypt_name(), dm::UdevRules::kNoDisk));
    }
    // The store only grows at its end: a noflush suspend holds its I/O, none
    // of which waits for us.
    DMCOW_RETURN_IF_ERROR(dm::LoadTargets(store_name(), StoreTable()));
    DMCOW_RETURN_IF_ERROR(dm::Suspend(store_name()));
    return dm::Resume(store_name(), dm::UdevRules::kNoDisk);
  }

  PluginOptions options_;
  bool read_only_ = false, no_backing_ = false;
  std::string image_fd_param_, backing_label_;
  FdEnv files_;  // the chain's files, opened once (before image_: it reads through them)
  std::string backing_, prefix_, scratch_dir_;
  uint64_t scratch_max_ = uint64_t{1} << 30;
  std::unique_ptr<dmcow::ImageLock> lock_, backing_lock_;
  std::unique_ptr<Image> image_;
  dmcow::DeviceImage* device_ = nullptr;  // image_'s serving calls (image_->AsDeviceImage())
  std::unique_ptr<Qcow2Mapper> mapper_;
  int image_fd_ = -1, scratch_fd_ = -1;
  uint64_t original_size_ = 0;
  uint64_t image_bytes_ = 0;  // of the image reachable through the store
  BlockDev image_loop_, scratch_loop_, backing_dev_;
  std::string scratch_loop_devt_;
  bool store_created_ = false, base_created_ = false;
  std::map<size_t, int> secret_fds_;  // secretK=FD by K; -1 once read
  bool encrypted_ = false, crypt_created_ = false;
  std::string crypt_devt_;  // "major:minor" of PREFIX-crypt
};

}  // namespace

Status MakeQcow2Plugin(const PluginOptions& options, std::unique_ptr<Plugin>* out) {
  if (options.args.size() != 1) {
    return Status::InvalidArgument("the qcow2 plugin takes one argument, IMAGE (got " +
                                   std::to_string(options.args.size()) + ")");
  }
  for (const auto& [key, value] : options.params) {
    const bool chain_key = key.size() > 5 && key.compare(0, 5, "chain") == 0 &&
                           key.find_first_not_of("0123456789", 5) == std::string::npos && key[5] != '0';
    const bool secret_key = key.size() > 6 && key.size() <= 8 && key.compare(0, 6, "secret") == 0 &&
                            key.find_first_not_of("0123456789", 6) == std::string::npos;
    if (key != "read_only" && key != "backing" && key != "name" && key != "scratch_dir" && key != "scratch_max" &&
        key != "image_fd" && key != "no_backing" && !chain_key && !secret_key) {
      return Status::InvalidArgument("the qcow2 plugin has no setting '" + key + "'");
    }
    auto fd_number = [](const std::string& v) {
      return !v.empty() && v.size() <= 6 && v.find_first_not_of("0123456789") == std::string::npos && std::stoi(v) >= 3;
    };
    if (secret_key && !fd_number(value)) {
      return Status::InvalidArgument(key + "=" + value + ": expected a descriptor number (3 or more)");
    }
    if (key == "image_fd" && !fd_number(value)) {
      return Status::InvalidArgument("image_fd=" + value + ": expected a descriptor number (3 or more)");
    }
    if (chain_key && (value.find(':') == std::string::npos || !fd_number(value.substr(0, value.find(':'))) ||
                      value.find(':') + 1 == value.size())) {
      return Status::InvalidArgument(key + "=" + value + ": expected FD:NAME");
    }
    if (chain_key && options.params.count("image_fd") == 0) {
      return Status::InvalidArgument(key + " needs image_fd");
    }
    if (key == "no_backing" && value != "0" && value != "1") {
      return Status::InvalidArgument("no_backing=" + value + ": expected 0 or 1");
    }
    if (key == "scratch_max" &&
        (value.empty() || value.size() > 19 || value.find_first_not_of("0123456789") != std::string::npos)) {
      return Status::InvalidArgument("scratch_max=" + value + ": expected a number of bytes");
    }
    if (key == "read_only" && value != "0" && value != "1") {
      return Status::InvalidArgument("read_only=" + value + ": expected 0 or 1");
    }
  }
  if (options.chunk_sectors != 0) {
    return Status::InvalidArgument("the qcow2 plugin's chunk is the image's cluster (no --chunk-size)");
  }
  out->reset(new Qcow2Plugin(options));
  return Status::OK();
}

}  // namespace dmcowd
