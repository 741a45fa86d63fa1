// Format detection and backing-chain assembly.
#include <cstring>
#include <vector>

#include "dmcow/check.h"
#include "dmcow/fail_stop_file.h"
#include "dmcow/image.h"
#include "image/image_base.h"
#include "image/probe.h"
#include "image/raw_image.h"
#include "qcow1/qcow1_image.h"
#include "qcow2/qcow2_image.h"
#include "util.h"

namespace dmcow {
namespace {

std::string WithoutPrefix(const std::string& msg, const std::string& prefix) {
  return msg.rfind(prefix, 0) == 0 ? msg.substr(prefix.size()) : msg;
}

// An image of the chain being opened, above the one being opened now.
struct ChainLink {
  std::string path;
  bool has_identity = false;  // else the Env cannot tell, and paths are compared
  FileIdentity identity;
};

// Opens `path` as one layer and, below it, its backing chain. `chain` holds
// the layers above; `referrer` is the one whose header names `path` (empty
// for the top). Headers come first, all the way down: a loop, a chain too
// deep or a missing backing file is refused before any image loads a table
// (LoadTables), and *chain_table_bytes counts what the tables then take.
Status OpenLayer(const std::string& path, const std::string& format_hint, const OpenOptions& options,
                 const std::string& snapshot, const std::string& referrer, std::vector<ChainLink>* chain,
                 uint64_t* chain_table_bytes, std::unique_ptr<Image>* image) {
  Env* env = options.env;
  const int depth = static_cast<int>(chain->size());
  if (depth > options.max_chain_depth) {
    return Status::Corrupt(path + ": backing chain is deeper than " + std::to_string(options.max_chain_depth) +
                           " images");
  }
  std::unique_ptr<File> file;
  Status opened = env->OpenFile(path, options.writable ? OpenMode::kReadWrite : OpenMode::kReadOnly, &file);
  if (!opened.ok()) {
    // A missing backing file is worded by the caller below, and a lock
    // conflict (Busy) is worded by the Env that took the lock, as QEMU words
    // it. Anything else (a FIFO, a socket or a character device refused by
    // the Env, no permission) names the image whose header named the file.
    if (referrer.empty() || opened.IsNotFound() || opened.IsBusy()) return opened;
    return Status::InvalidArgument(referrer + ": could not open backing file '" + path +
                                   "': " + WithoutPrefix(opened.message(), path + ": "));
  }
  // Rule (8) of qcow2/qcow2_write.cc: the first failed write or sync ends writing.
  if (options.writable) file = std::make_unique<FailStopFile>(std::move(file));

  // A loop is found by what the file is, not by how it is named: a symbolic
  // link, a hard link or another spelling of a path above closes one too.
  // QEMU's "qemu-img info --backing-chain" words it the same way.
  ChainLink link;
  link.path = path;
  Status s = file->Identity(&link.identity);
  if (!s.ok() && !s.IsNotSupported()) return s;
  link.has_identity = s.ok();
  for (const ChainLink& above : *chain) {
    const bool same = link.has_identity && above.has_identity ? link.identity == above.identity : path == above.path;
    if (!same) continue;
    std::string msg = referrer + ": backing file '" + path + "' creates an infinite loop";
    if (above.path != path) msg += " (it is " + above.path + ", already in the backing chain)";
    return Status::Corrupt(msg);
  }

  std::string format = format_hint;
  if (format.empty()) {
    // Another program's format (vmdk, vdi, ...) is refused, not read as raw:
    // its container is not the guest's disk. -f raw reads it as raw.
    DMCOW_RETURN_IF_ERROR(ProbeImageFormat(file.get(), &format));
    if (!IsSupportedFormat(format)) return UnsupportedFormat(path, format);
  }

  const std::string* key =
      static_cast<size_t>(depth) < options.layer_secrets.size() ? options.layer_secrets[depth] : nullptr;
  std::unique_ptr<Image> layer;
  if (format == "raw") {
    if (!snapshot.empty()) return Status::NotSupported(path + ": raw images have no snapshots");
    DMCOW_RETURN_IF_ERROR(RawImage::Open(std::move(file), options.writable, &layer));
  } else if (format == "qcow2") {
    if (options.writable && snapshot.empty()) {
      // As QEMU does on a read-write open: lazy refcounts left unflushed by a
      // crash (the dirty bit) are rebuilt by a full repair first.
      CheckResult repaired;
      DMCOW_RETURN_IF_ERROR(RepairDirtyQcow2(file.get(), &repaired));
    }
    DMCOW_RETURN_IF_ERROR(Qcow2Image::Open(std::move(file), options, key, snapshot, &layer));
  } else if (format == "qcow") {
    if (!snapshot.empty()) return Status::NotSupported(path + ": qcow images have no snapshots");
    DMCOW_RETURN_IF_ERROR(Qcow1Image::Open(std::move(file), options, key, &layer));
  } else {
    return Status::NotSupported(path + ": unknown image format '" + format + "'");
  }
  auto* base = static_cast<ImageBase*>(layer.get());

  const ImageInfo& info = layer->info();
  if (options.open_backing && !info.backing_filename.empty()) {
    const std::string& name = info.backing_filename;
    if (name.rfind("json:", 0) == 0) {
      return Status::NotSupported(path + ": backing file name '" + name +
                                  "' uses a json: pseudo-protocol, which is not supported");
    }
    const std::string& backing_format = info.backing_format;
    if (!backing_format.empty() && !IsSupportedFormat(backing_format)) {
      return Status::NotSupported(path + ": backing format '" + backing_format + "' is not supported");
    }
    std::unique_ptr<Image> backing;
    OpenOptions backing_options = options;
    backing_options.writable = false;  // backing files are never written
    chain->push_back(std::move(link));
    s = OpenLayer(info.full_backing_filename, backing_format, backing_options, "", path, chain, chain_table_bytes,
                  &backing);
    chain->pop_back();
    if (!s.ok()) {
      if (s.IsNotFound()) {
        return Status::NotFound(path + ": could not open backing file '" + info.full_backing_filename +
                                "': " + s.message());
      }
      // A lock conflict and a missing or wrong key keep QEMU's words, one prefix
      // per level they pass.
      if (s.IsBusy()) return Status::Busy("Could not open backing file: " + s.message());
      if (s.key_refusal() != Status::KeyRefusal::kNone)
        return s.WithMessage("Could not open backing file: " + s.message());
      return s;
    }
    base->SetBacking(std::move(backing));
  }
  // The chain below is whole and sound: this image's tables are needed now.
  DMCOW_RETURN_IF_ERROR(base->LoadTables(options, chain_table_bytes));
  *image = std::move(layer);
  return Status::OK();
}

}  // namespace

Status ProbeFormat(Env* env, const std::string& path, std::string* format) {
  std::unique_ptr<File> file;
  DMCOW_RETURN_IF_ERROR(env->OpenFile(path, OpenMode::kReadOnly, &file));
  return ProbeImageFormat(file.get(), format);
}

std::string ResolveNameBesideImage(const std::string& image_path, const std::string& name) {
  return ResolveRelativeTo(image_path, name);
}

std::string LayerMissingKey(const Status& s) {
  return s.key_refusal() == Status::KeyRefusal::kMissing ? s.refused_layer() : "";
}

Status OpenImage(const std::string& path, const OpenOptions& options, std::unique_ptr<Image>* image) {
  std::vector<ChainLink> chain;
  uint64_t chain_table_bytes = 0;
  return OpenLayer(path, options.format, options, options.snapshot, "", &chain, &chain_table_bytes, image);
}

}  // namespace dmcow
