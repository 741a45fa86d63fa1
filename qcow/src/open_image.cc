// Format detection and backing-chain assembly.
#include <cstring>
#include <vector>

#include "dmcow/check.h"
#include "dmcow/fail_stop_file.h"
#include "dmcow/image.h"
#include "image_base.h"
#include "qcow1_image.h"
#include "qcow2_image.h"
#include "raw_image.h"
#include "util.h"

namespace dmcow {
namespace {

Status ProbeFile(File* file, std::string* format) {
  uint8_t head[8] = {};
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(file->Read(0, sizeof(head), head, &got));
  if (got >= 8 && std::memcmp(head, "QFI\xfb", 4) == 0) {
    *format = LoadBE32(head + 4) == 1 ? "qcow" : "qcow2";
  } else {
    *format = "raw";
  }
  return Status::OK();
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
  Env* env = options.env ? options.env : Env::Default();
  const int depth = static_cast<int>(chain->size());
  if (depth > options.max_chain_depth) {
    return Status::Corrupt(path + ": backing chain is deeper than " + std::to_string(options.max_chain_depth) +
                           " images");
  }
  std::unique_ptr<File> file;
  DMCOW_RETURN_IF_ERROR(env->OpenFile(path, options.writable ? OpenMode::kReadWrite : OpenMode::kReadOnly, &file));
  // Rule (8) of qcow2_write.cc: the first failed write or sync ends writing.
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
  if (format.empty()) DMCOW_RETURN_IF_ERROR(ProbeFile(file.get(), &format));

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
    DMCOW_RETURN_IF_ERROR(Qcow2Image::Open(std::move(file), options, snapshot, &layer));
  } else if (format == "qcow") {
    if (!snapshot.empty()) return Status::NotSupported(path + ": qcow images have no snapshots");
    DMCOW_RETURN_IF_ERROR(Qcow1Image::Open(std::move(file), options, &layer));
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
    if (!backing_format.empty() && backing_format != "raw" && backing_format != "qcow2" &&
        backing_format != "qcow") {
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
  return ProbeFile(file.get(), format);
}

Status OpenImage(const std::string& path, const OpenOptions& options, std::unique_ptr<Image>* image) {
  std::vector<ChainLink> chain;
  uint64_t chain_table_bytes = 0;
  return OpenLayer(path, options.format, options, options.snapshot, "", &chain, &chain_table_bytes, image);
}

}  // namespace dmcow
