// Sizes on the command line: digits with an optional K, M or G suffix
// (powers of 1024) and an optional B, as in "64K" or "1GB".
#ifndef DMCOWD_SIZE_ARG_H_
#define DMCOWD_SIZE_ARG_H_

#include <cstdint>

namespace dmcowd {

// False for anything else, or above 1 PiB.
bool ParseSizeArg(const char* text, uint64_t* out);

}  // namespace dmcowd

#endif  // DMCOWD_SIZE_ARG_H_
