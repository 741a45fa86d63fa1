#include "size_arg.h"

#include <cerrno>
#include <cstdlib>

namespace dmcowd {

bool ParseSizeArg(const char* text, uint64_t* out) {
  if (*text < '0' || *text > '9') return false;  // strtoull would take "-1" and " 1"
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text, &end, 10);
  if (errno || end == text) return false;
  unsigned shift = 0;
  if (*end == 'k' || *end == 'K')
    shift = 10, end++;
  else if (*end == 'm' || *end == 'M')
    shift = 20, end++;
  else if (*end == 'g' || *end == 'G')
    shift = 30, end++;
  if (*end == 'b' || *end == 'B') end++;
  if (*end || v > (uint64_t{1} << (50 - shift))) return false;
  *out = static_cast<uint64_t>(v) << shift;
  return true;
}

}  // namespace dmcowd
