// A failed system call as a Status: "<what>: <strerror(err)>".
#ifndef DMCOWD_SYS_ERROR_H_
#define DMCOWD_SYS_ERROR_H_

#include <cstring>
#include <string>

#include "dmcow/status.h"

namespace dmcowd {

inline dmcow::Status Errno(const std::string& what, int err) {
  return dmcow::Status::IOError(what + ": " + std::strerror(err));
}

}  // namespace dmcowd

#endif  // DMCOWD_SYS_ERROR_H_
