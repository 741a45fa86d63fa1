// Format-specific checkers behind CheckImageFile (image/check_image.cc).
#ifndef DMCOW_QCOW_CHECK_INTERNAL_H_
#define DMCOW_QCOW_CHECK_INTERNAL_H_

#include "dmcow/check.h"

namespace dmcow {

// Legacy qcow (version 1): bounds, alignment and overlaps of every table
// entry (qcow1/qcow1_check.cc). Repair is not supported.
Status CheckQcow1(File* file, const CheckOptions& options, CheckResult* result);

}  // namespace dmcow

#endif  // DMCOW_QCOW_CHECK_INTERNAL_H_
