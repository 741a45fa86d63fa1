// Format detection and backing-chain assembly.
#include <cstring>

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

Status OpenLayer(const std::string& path, const std::string& format_hint, const OpenOptions& options,
                 const std::string& snapshot, int depth, std::unique_ptr<Image>* image) {
  Env* env = options.env ? options.env : Env::Default();
  if (depth > options.max_chain_depth) {
    return Status::Corrupt(path + ": backing chain is deeper than " + std::to_string(options.max_chain_depth) +
                           " images (a loop?)");
  }
  std::unique_ptr<File> file;
  DMCOW_RETURN_IF_ERROR(env->OpenFile(path, options.writable ? OpenMode::kReadWrite : OpenMode::kReadOnly, &file));
  // Rule (8) of qcow2_write.cc: the first failed write or sync ends writing.
  if (options.writable) file = std::make_unique<FailStopFile>(std::move(file));

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
    Status s = OpenLayer(info.full_backing_filename, backing_format, backing_options, "", depth + 1, &backing);
    if (!s.ok()) {
      if (s.IsNotFound()) {
        return Status::NotFound(path + ": could not open backing file '" + info.full_backing_filename +
                                "': " + s.message());
      }
      return s;
    }
    static_cast<ImageBase*>(layer.get())->SetBacking(std::move(backing));
  }
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
  return OpenLayer(path, options.format, options, options.snapshot, 0, image);
}

}  // namespace dmcow
