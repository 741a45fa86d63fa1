// Small helpers shared by the drivers: big-endian access, checked arithmetic,
// message formatting and path handling.
#ifndef DMCOW_QCOW_UTIL_H_
#define DMCOW_QCOW_UTIL_H_

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace dmcow {

inline uint16_t LoadBE16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
inline uint32_t LoadBE32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
inline uint64_t LoadBE64(const uint8_t* p) { return (uint64_t{LoadBE32(p)} << 32) | LoadBE32(p + 4); }
inline void StoreBE16(uint8_t* p, uint16_t v) {
  p[0] = v >> 8;
  p[1] = v & 0xff;
}
inline void StoreBE32(uint8_t* p, uint32_t v) {
  p[0] = v >> 24;
  p[1] = (v >> 16) & 0xff;
  p[2] = (v >> 8) & 0xff;
  p[3] = v & 0xff;
}
inline void StoreBE64(uint8_t* p, uint64_t v) {
  StoreBE32(p, static_cast<uint32_t>(v >> 32));
  StoreBE32(p + 4, static_cast<uint32_t>(v));
}

// a + b, false on overflow.
inline bool CheckedAdd(uint64_t a, uint64_t b, uint64_t* sum) { return !__builtin_add_overflow(a, b, sum); }
inline bool CheckedMul(uint64_t a, uint64_t b, uint64_t* product) { return !__builtin_mul_overflow(a, b, product); }

inline uint64_t DivRoundUp(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }
inline uint64_t RoundUp(uint64_t v, uint64_t align) { return DivRoundUp(v, align) * align; }
inline uint64_t RoundDown(uint64_t v, uint64_t align) { return v / align * align; }
inline bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// "0x1f000"
inline std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%#llx", static_cast<unsigned long long>(v));
  return v == 0 ? std::string("0") : std::string(buf);
}

// Directory part of a path, "" when it has none ("a/b" -> "a", "b" -> "").
inline std::string PathDirname(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return "";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Resolves `name` relative to the directory of `base_file`, as QEMU does for
// backing and data file names: absolute names and bases without a directory
// are used as they are.
inline std::string ResolveRelativeTo(const std::string& base_file, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  std::string dir = PathDirname(base_file);
  if (dir.empty()) return name;
  if (dir == "/") return "/" + name;
  return dir + "/" + name;
}

}  // namespace dmcow

#endif  // DMCOW_QCOW_UTIL_H_
