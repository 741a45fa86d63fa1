// Format probing as QEMU 7.2 does it: every driver scores the first 2 KiB
// (short files read as if padded with zeros) and the highest score wins;
// raw scores 1, so a file no probe claims is raw. The probes below are
// written from the rules of QEMU's block/<format>.c .bdrv_probe functions.
#include "image/probe.h"

#include <cstring>

#include "util.h"

namespace dmcow {
namespace {

constexpr size_t kProbeBytes = 2048;  // QEMU's BLOCK_PROBE_BUF_SIZE

uint32_t LoadLE32(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}

bool StartsWith(const uint8_t* buf, const char* magic, size_t len) { return std::memcmp(buf, magic, len) == 0; }

// A NUL-terminated string equal to `s` at buf (QEMU's strcmp on a header field).
bool FieldIs(const uint8_t* buf, size_t field_len, const char* s) {
  const size_t n = std::strlen(s);
  return n < field_len && std::memcmp(buf, s, n + 1) == 0;
}

// vmdk: a sparse extent ("KDMV", or "COWD" for VMFS), or a text descriptor
// whose first line that is neither a comment nor blank is version=1..3.
bool IsVmdk(const uint8_t* buf, size_t size) {
  if (StartsWith(buf, "KDMV", 4) || StartsWith(buf, "COWD", 4)) return true;
  const char* p = reinterpret_cast<const char*>(buf);
  const char* end = p + size;
  while (p < end) {
    if (*p == '#') {  // a comment line
      while (p < end && *p != '\n') p++;
      p++;
      continue;
    }
    if (*p == ' ') {  // only blank lines may come before version=
      while (p < end && *p == ' ') p++;
      if (p < end && *p == '\r') p++;
      if (p == end || *p != '\n') return false;
      p++;
      continue;
    }
    for (const char* line :
         {"version=1\n", "version=2\n", "version=3\n", "version=1\r\n", "version=2\r\n", "version=3\r\n"}) {
      const size_t n = std::strlen(line);
      if (static_cast<size_t>(end - p) >= n && std::memcmp(p, line, n) == 0) return true;
    }
    return false;
  }
  return false;
}

// bochs: the growing redolog header, version 1 or 2.
bool IsBochs(const uint8_t* buf) {
  const uint32_t version = LoadLE32(buf + 64);
  return FieldIs(buf, 32, "Bochs Virtual HD Image") && FieldIs(buf + 32, 16, "Redolog") &&
         FieldIs(buf + 48, 16, "Growing") && (version == 0x00020000 || version == 0x00010000);
}

bool EndsWith(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() > n && s.compare(s.size() - n, n, suffix) == 0;
}

}  // namespace

Status ProbeImageFormat(File* file, std::string* format) {
  uint8_t buf[kProbeBytes] = {};
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(file->Read(0, sizeof(buf), buf, &got));
  *format = "raw";
  if (got == 0) return Status::OK();  // QEMU: an empty file is raw
  if (StartsWith(buf, "QFI\xfb", 4)) {
    *format = LoadBE32(buf + 4) == 1 ? "qcow" : "qcow2";
  } else if (IsVmdk(buf, sizeof(buf))) {
    *format = "vmdk";
  } else if (LoadLE32(buf + 64) == 0xbeda107f) {  // after 64 bytes of text
    *format = "vdi";
  } else if (StartsWith(buf, "conectix", 8)) {  // dynamic VHD: the footer's copy at 0
    *format = "vpc";
  } else if (StartsWith(buf, "vhdxfile", 8)) {
    *format = "vhdx";
  } else if (StartsWith(buf, "QED\0", 4)) {
    *format = "qed";
  } else if ((StartsWith(buf, "WithoutFreeSpace", 16) || StartsWith(buf, "WithouFreSpacExt", 16)) &&
             LoadLE32(buf + 16) == 2) {
    *format = "parallels";
  } else if (StartsWith(buf, "LUKS\xba\xbe", 6) && LoadBE16(buf + 6) == 1) {
    *format = "luks";
  } else if (IsBochs(buf)) {
    *format = "bochs";
  } else if (StartsWith(buf, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
                        83)) {
    *format = "cloop";  // scores 2, above raw
  } else if (EndsWith(file->name(), ".dmg")) {
    *format = "dmg";  // QEMU's dmg probe looks at the name only (score 2)
  }
  return Status::OK();
}

bool IsSupportedFormat(const std::string& format) { return format == "raw" || format == "qcow2" || format == "qcow"; }

Status UnsupportedFormat(const std::string& path, const std::string& format) {
  return Status::NotSupported(path + ": unsupported image format '" + format + "'");
}

}  // namespace dmcow
