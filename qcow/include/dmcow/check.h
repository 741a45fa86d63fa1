// Consistency check and repair of disk images: the engine behind
// `dmcow-img check`, which agrees with `qemu-img check` on what it counts.
//
// A qcow2 image is checked as QEMU 7.2 checks it (block/qcow2-refcount.c):
// every cluster referenced by the header, the active and every snapshot's
// L1/L2 tables, the snapshot table, the refcount table and blocks, the
// bitmap directory and tables and the encryption header is counted, and the
// counts are compared with the stored refcounts. Leaks (refcount above the
// references), corruptions (refcount below them, COPIED flags that disagree
// with refcounts, misaligned entries, entries past the end of the file,
// refcount overflow, a damaged snapshot table, a broken refcount structure)
// and internal errors are counted exactly as qemu-img counts them.
//
// Legacy qcow (version 1) images, which qemu-img cannot check, are checked
// too: every table entry must be aligned and lie inside the file, and no
// cluster may serve two purposes.
//
// Repair (qcow2 only) is ordered so that a crash at any point leaves an
// image that a second repair can finish; see
// qcow/src/qcow2/check/qcow2_check_repair.cc.
//
// Thread safety: CheckImage may be called concurrently on different files.
#ifndef DMCOW_CHECK_H_
#define DMCOW_CHECK_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dmcow/env.h"
#include "dmcow/status.h"

namespace dmcow {

enum class RepairMode {
  kNone,   // only look
  kLeaks,  // free leaked clusters (qemu-img check -r leaks)
  kAll,    // also fix refcounts, COPIED flags, the refcount structure, the
           // snapshot table, and drop table entries that cannot be valid
           // (qemu-img check -r all, and more)
};

// One thing the check found or did, for a person to read.
struct CheckFinding {
  enum class Kind {
    kCorruption,  // counted in corruptions
    kLeak,        // counted in leaks
    kCheckError,  // counted in check_errors: the check could not look somewhere
    kRepaired,    // a repair that was made (counted in *_fixed)
    kNote,        // informational: counts nothing (dirty bit, overlaps named)
  };
  Kind kind = Kind::kNote;
  uint64_t offset = 0;  // host offset the finding is about (0 when none)
  std::string message;  // one line, e.g. "ERROR cluster 5 refcount=1 reference=2"
};

struct CheckOptions {
  std::string format;  // "qcow2", "qcow", "raw"; empty = detect from content
  RepairMode repair = RepairMode::kNone;
  Env* env = Env::Default();  // all file access
  // Called for every finding as it is made (qemu-img prints these to stderr
  // as it goes). May be empty.
  std::function<void(const CheckFinding&)> on_finding;
  // At most this many findings are kept in CheckResult::findings; the rest
  // are only counted (a damaged large image can have millions).
  size_t max_findings = 10000;
};

// The counts of qemu's BdrvCheckResult / ImageCheck.
struct CheckResult {
  std::string format;         // format that was checked
  bool opened = false;        // the image was opened and its check begun
  uint64_t check_errors = 0;  // places the check could not examine
  uint64_t corruptions = 0;   // remaining after repair
  uint64_t leaks = 0;         // remaining after repair
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t total_clusters = 0;  // virtual size in clusters
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  uint64_t image_end_offset = 0;
  // Whether a repair fixed something and the image was then checked again
  // (the counts above come from that second check, as with qemu-img).
  bool rechecked = false;
  std::vector<CheckFinding> findings;
  uint64_t findings_dropped = 0;  // beyond max_findings
};

// Checks (and with options.repair, repairs) the image at `path`. The file is
// opened through options.env by the checker itself, not by OpenImage, so
// images that OpenImage refuses as corrupt can still be examined.
//
// Returns OK when the check ran to completion, whatever it found (see the
// counts). Returns NotSupported for formats that cannot be checked (raw:
// qemu-img's exit code 63); any other error means the check could not be
// completed (qemu-img's "Check failed", exit code 1) or the image could not
// be opened (result->opened tells which); *result then holds what was
// counted before the failure.
Status CheckImage(const std::string& path, const CheckOptions& options, CheckResult* result);

// The same on a file already open (read-write for a repair).
Status CheckImageFile(File* file, const CheckOptions& options, CheckResult* result);

// What QEMU does when a qcow2 image with the dirty bit set (lazy refcounts
// left unflushed, incompatible feature bit 0) is opened for writing: a full
// repair (as check -r all), after which the dirty bit is cleared. Fails if
// the repair hit internal errors or left corruptions (the bit then stays
// set). Does nothing (and succeeds) when the bit is not set. `file` must be
// open read-write; the caller re-reads the header afterwards.
Status RepairDirtyQcow2(File* file, CheckResult* result);

}  // namespace dmcow

#endif  // DMCOW_CHECK_H_
