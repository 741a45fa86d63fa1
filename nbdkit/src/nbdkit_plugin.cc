// nbdkit-dmcow-plugin: qcow2 (v2, v3), legacy qcow and raw images, with
// their backing chains, served over NBD by nbdkit on the dmcow engine.
//
//   nbdkit dmcow [file=]IMAGE [format=qcow2|qcow|raw] [readonly=1]
//                [backing=null] [snapshot=NAME]
//
// The image is opened once, when nbdkit is ready to serve (errors are
// reported before it serves anything), and shared by every connection
// (served_image.h): PARALLEL threads, multi-conn, flush and FUA durable
// through the engine's ordering. Man page: nbdkit/nbdkit-dmcow-plugin.1.
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#include <nbdkit-plugin.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>

#include "served_image.h"

namespace {

using dmcow_nbdkit::ServedImage;
using dmcow_nbdkit::ServeOptions;
using dmcow_nbdkit::Status;

ServeOptions options;
bool file_given = false;
std::unique_ptr<ServedImage> served;

// Reports a failed call to nbdkit: the message, and the errno the client sees.
int Fail(const Status& s) {
  nbdkit_error("%s", s.ToString().c_str());
  int err = EIO;
  if (s.IsNoSpace()) err = ENOSPC;
  if (s.IsNotSupported()) err = ENOTSUP;
  if (s.code() == Status::Code::kInvalidArgument) err = EINVAL;
  nbdkit_set_error(err);
  return -1;
}

int Config(const char* key, const char* value) {
  const std::string k = key;
  if (k == "file") {
    if (file_given) {
      nbdkit_error("file=%s: the image is given twice", value);
      return -1;
    }
    char* absolute = nbdkit_absolute_path(value);  // nbdkit may change directory when it forks
    if (absolute == nullptr) return -1;
    options.path = absolute;
    std::free(absolute);
    file_given = true;
  } else if (k == "format") {
    const std::string v = value;
    if (v != "qcow2" && v != "qcow" && v != "raw") {
      nbdkit_error("format=%s: not one of qcow2, qcow, raw", value);
      return -1;
    }
    options.format = v;
  } else if (k == "readonly") {
    const int b = nbdkit_parse_bool(value);
    if (b < 0) {
      nbdkit_error("readonly=%s: not a boolean (1 or 0)", value);
      return -1;
    }
    options.read_only = b != 0;
  } else if (k == "backing") {
    if (std::strcmp(value, "null") != 0) {
      nbdkit_error("backing=%s: only backing=null is known (the backing file is the one the image names)", value);
      return -1;
    }
    options.no_backing = true;
  } else if (k == "snapshot") {
    if (*value == '\0') {
      nbdkit_error("snapshot=: the snapshot id or name is empty");
      return -1;
    }
    options.snapshot = value;
  } else {
    nbdkit_error("unknown parameter '%s' (see nbdkit-dmcow-plugin(1))", key);
    return -1;
  }
  return 0;
}

int ConfigComplete() {
  if (!file_given) {
    nbdkit_error("the image is missing: nbdkit dmcow IMAGE (or file=IMAGE)");
    return -1;
  }
  return 0;
}

int GetReady() {
  const Status s = ServedImage::Open(options, &served);
  return s.ok() ? 0 : Fail(s);
}

void Unload() {
  if (served == nullptr) return;
  // No client is left to hear a failure: nbdkit's log is.
  if (const Status s = served->Flush(); !s.ok()) nbdkit_error("closing: %s", s.ToString().c_str());
  served.reset();  // the close: persistent bitmaps get the written bits
}

void* Open(int /*readonly*/) { return served.get(); }

ServedImage* Served(void* handle) { return static_cast<ServedImage*>(handle); }

int64_t GetSize(void* h) { return static_cast<int64_t>(Served(h)->size()); }
int CanWrite(void* h) { return Served(h)->writable(); }
int CanFlush(void*) { return 1; }
int IsRotational(void*) { return 0; }
int CanTrim(void* h) { return Served(h)->writable(); }
int CanZero(void* h) { return Served(h)->writable(); }
int CanFastZero(void* h) { return Served(h)->fast_zero(); }
int CanFua(void* h) { return Served(h)->writable() ? NBDKIT_FUA_NATIVE : NBDKIT_FUA_NONE; }
int CanMultiConn(void*) { return 1; }
int CanExtents(void*) { return 1; }
// nbdkit reads and drops the range: the engine's caches (L2 tables,
// decompressed clusters) and the page cache then hold it.
int CanCache(void*) { return NBDKIT_CACHE_EMULATE; }

const char* ExportDescription(void* h) { return Served(h)->description().c_str(); }

int BlockSize(void* h, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
  *minimum = Served(h)->minimum_block();
  *preferred = Served(h)->preferred_block();
  *maximum = 0xffffffff;
  return 0;
}

int Pread(void* h, void* buf, uint32_t count, uint64_t offset, uint32_t /*flags*/) {
  const Status s = Served(h)->Read(offset, buf, count);
  return s.ok() ? 0 : Fail(s);
}

int Pwrite(void* h, const void* buf, uint32_t count, uint64_t offset, uint32_t flags) {
  const Status s = Served(h)->Write(offset, buf, count, flags & NBDKIT_FLAG_FUA);
  return s.ok() ? 0 : Fail(s);
}

int Flush(void* h, uint32_t /*flags*/) {
  const Status s = Served(h)->Flush();
  return s.ok() ? 0 : Fail(s);
}

int Trim(void* h, uint32_t count, uint64_t offset, uint32_t flags) {
  const Status s = Served(h)->Trim(offset, count, flags & NBDKIT_FLAG_FUA);
  return s.ok() ? 0 : Fail(s);
}

int Zero(void* h, uint32_t count, uint64_t offset, uint32_t flags) {
  const Status s = Served(h)->Zero(offset, count, flags & NBDKIT_FLAG_MAY_TRIM, flags & NBDKIT_FLAG_FAST_ZERO,
                                   flags & NBDKIT_FLAG_FUA);
  if (s.IsNotSupported() && (flags & NBDKIT_FLAG_FAST_ZERO)) {
    nbdkit_set_error(ENOTSUP);  // expected by the client: no message
    return -1;
  }
  return s.ok() ? 0 : Fail(s);
}

int Extents(void* h, uint32_t count, uint64_t offset, uint32_t flags, struct nbdkit_extents* extents) {
  const Status s = Served(h)->Extents(offset, count, flags & NBDKIT_FLAG_REQ_ONE,
                                      [extents](uint64_t start, uint64_t length, uint32_t type) {
                                        if (nbdkit_add_extent(extents, start, length, type) == 0) return Status::OK();
                                        return Status::IOError("nbdkit_add_extent failed");
                                      });
  return s.ok() ? 0 : Fail(s);
}

nbdkit_plugin MakePlugin() {
  nbdkit_plugin p{};
  p.name = "dmcow";
  p.longname = "dmcow qcow2/qcow/raw image plugin";
  p.version = "1.0";
  p.description = "Serves qcow2, qcow and raw images, with backing chains, on the dmcow engine";
  p.unload = Unload;
  p.config = Config;
  p.config_complete = ConfigComplete;
  p.config_help =
      "[file=]IMAGE        The image (qcow2, qcow, raw; probed unless format= is given).\n"
      "format=FMT          qcow2, qcow or raw.\n"
      "readonly=1          Open the image read-only.\n"
      "backing=null        Do not read the backing chain: unallocated ranges read as zeros.\n"
      "snapshot=NAME       Serve an internal snapshot (read-only).";
  p.magic_config_key = "file";
  p.get_ready = GetReady;
  p.open = Open;
  p.get_size = GetSize;
  p.can_write = CanWrite;
  p.can_flush = CanFlush;
  p.is_rotational = IsRotational;
  p.can_trim = CanTrim;
  p.can_zero = CanZero;
  p.can_fast_zero = CanFastZero;
  p.can_fua = CanFua;
  p.can_multi_conn = CanMultiConn;
  p.can_extents = CanExtents;
  p.can_cache = CanCache;
  p.export_description = ExportDescription;
  p.block_size = BlockSize;
  p.pread = Pread;
  p.pwrite = Pwrite;
  p.flush = Flush;
  p.trim = Trim;
  p.zero = Zero;
  p.extents = Extents;
  return p;
}

nbdkit_plugin plugin = MakePlugin();

}  // namespace

NBDKIT_REGISTER_PLUGIN(plugin)
