#include "served_image.h"

#include <algorithm>

namespace dmcow_nbdkit {

namespace {

std::string Size(uint64_t bytes) {
  if (bytes >= (1 << 20) && bytes % (1 << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  if (bytes >= 1024 && bytes % 1024 == 0) return std::to_string(bytes >> 10) + " KiB";
  return std::to_string(bytes) + " bytes";
}

std::string Describe(const dmcow::Image& image, const ServeOptions& options) {
  const dmcow::ImageInfo& info = image.info();
  std::string d = info.format;
  if (info.format == "qcow2") d += " v" + std::to_string(info.version);
  if (info.cluster_size != 0) d += ", " + Size(info.cluster_size) + " clusters";
  if (!options.snapshot.empty()) d += ", snapshot '" + options.snapshot + "'";
  if (options.no_backing && !info.backing_filename.empty()) d += ", backing file not read";
  // Base names only: clients need not learn the server's directories.
  for (const dmcow::Image* b = image.backing(); b != nullptr; b = b->backing()) {
    const std::string& name = b->filename();
    d += ", over " + name.substr(name.rfind('/') + 1) + " (" + b->info().format + ")";
  }
  return d;
}

}  // namespace

ServedImage::~ServedImage() = default;

Status ServedImage::Open(const ServeOptions& options, std::unique_ptr<ServedImage>* out) {
  std::unique_ptr<ServedImage> s(new ServedImage());
  s->writable_ = !options.read_only && options.snapshot.empty();
  dmcowd::ChainPolicy policy;
  policy.writable = s->writable_;
  policy.follow_backing = !options.no_backing;
  policy.open_data_files = true;
  policy.server = "the dmcow nbdkit plugin";
  std::vector<dmcowd::ChainFile> chain;
  DMCOW_RETURN_IF_ERROR(dmcowd::OpenChain(options.path, policy, &chain));
  // QEMU's locks, each on the descriptor the engine will read.
  using Mode = dmcow::ImageLock::Mode;
  auto lock = [&](const dmcowd::UniqueFd& fd, const std::string& name, Mode mode) {
    std::unique_ptr<dmcow::ImageLock> l;
    DMCOW_RETURN_IF_ERROR(dmcow::ImageLock::AcquireFd(fd.get(), name, mode, &l));
    s->locks_.push_back(std::move(l));
    return Status::OK();
  };
  for (size_t i = 0; i < chain.size(); i++) {
    const Mode mode = i == 0 && s->writable_ ? Mode::kReadWrite : Mode::kReadOnly;
    DMCOW_RETURN_IF_ERROR(lock(chain[i].fd, chain[i].name, mode));
    if (!chain[i].data_file_name.empty()) DMCOW_RETURN_IF_ERROR(lock(chain[i].data_fd, chain[i].data_file_name, mode));
  }
  for (dmcowd::ChainFile& f : chain) {
    s->files_.Add(f.name, std::move(f.fd));
    if (!f.data_file_name.empty()) s->files_.Add(f.data_file_name, std::move(f.data_fd));
  }
  dmcow::OpenOptions o;
  o.format = options.format;
  o.snapshot = options.snapshot;
  o.writable = s->writable_;
  o.open_backing = !options.no_backing;
  o.env = &s->files_;  // nothing is opened by name again
  // Every write comes through the engine (no kernel path beside it), so
  // persistent bitmaps are kept true as qemu-nbd keeps them: in use while
  // served, the written ranges' bits set at the close.
  o.maintain_bitmaps = s->writable_;
  Status opened = dmcow::OpenImage(options.path, o, &s->image_);
  if (const std::string layer = dmcow::LayerMissingKey(opened); !layer.empty()) {
    return Status::NotSupported(layer + ": image is encrypted; the plugin takes no keys yet");
  }
  DMCOW_RETURN_IF_ERROR(opened);
  const dmcow::ImageInfo& info = s->image_->info();
  s->fast_zero_ = info.format == "qcow2" && (info.version >= 3 || s->image_->backing() == nullptr);
  s->description_ = Describe(*s->image_, options);
  *out = std::move(s);
  return Status::OK();
}

uint32_t ServedImage::minimum_block() const { return size() % 512 == 0 ? 512 : 1; }

uint32_t ServedImage::preferred_block() const {
  const uint64_t cluster = image_->info().cluster_size;
  return static_cast<uint32_t>(std::clamp<uint64_t>(cluster, 4096, 32 << 20));
}

Status ServedImage::Read(uint64_t offset, void* buf, uint32_t len) { return image_->Read(offset, buf, len); }

Status ServedImage::Write(uint64_t offset, const void* buf, uint32_t len, bool fua) {
  DMCOW_RETURN_IF_ERROR(image_->Write(offset, buf, len));
  return fua ? image_->Flush() : Status::OK();
}

Status ServedImage::Flush() { return image_->Flush(); }

Status ServedImage::Trim(uint64_t offset, uint32_t len, bool fua) {
  DMCOW_RETURN_IF_ERROR(image_->Discard(offset, len));
  return fua ? image_->Flush() : Status::OK();
}

Status ServedImage::Zero(uint64_t offset, uint32_t len, bool may_trim, bool fast, bool fua) {
  if (fast && !fast_zero_) {
    return Status::NotSupported(image_->filename() + ": zeroing " + image_->info().format +
                                " here writes zeros: not fast");
  }
  DMCOW_RETURN_IF_ERROR(may_trim ? image_->WriteZeroesMayUnmap(offset, len) : image_->WriteZeroes(offset, len));
  return fua ? image_->Flush() : Status::OK();
}

Status ServedImage::Extents(uint64_t offset, uint32_t len, bool one,
                            const std::function<Status(uint64_t, uint64_t, uint32_t)>& add) {
  const uint64_t end = std::min<uint64_t>(offset + len, size());
  while (offset < end) {
    dmcow::MapExtent e;
    DMCOW_RETURN_IF_ERROR(dmcow::GetMapExtent(image_.get(), offset, end - offset, &e));
    if (e.length == 0)
      return Status::Corrupt(image_->filename() + ": no block status at offset " + std::to_string(offset));
    // As qemu-nbd reports: a hole where no layer stores data, zero where
    // the range reads as zeros.
    const uint32_t flags = (e.data ? 0 : kExtentHole) | (e.zero ? kExtentZero : 0);
    DMCOW_RETURN_IF_ERROR(add(offset, e.length, flags));
    offset += e.length;
    if (one) break;
  }
  return Status::OK();
}

}  // namespace dmcow_nbdkit
