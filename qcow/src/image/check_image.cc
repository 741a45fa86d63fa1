// CheckImage: the entry points of dmcow/check.h. Picks the format, runs the
// qcow2 check (with the table fixes of -r all first) and, as qemu-img does,
// checks a repaired image once more so that the counts describe the result.
#include <cstring>

#include "dmcow/check.h"
#include "dmcow/fail_stop_file.h"
#include "image/check_internal.h"
#include "image/probe.h"
#include "qcow2/check/qcow2_check.h"
#include "qcow2/qcow2_metadata_tables.h"
#include "util.h"

namespace dmcow {
namespace {

void CopyCounts(const Qcow2CheckCounts& c, CheckResult* r) {
  auto u = [](int64_t v) { return v < 0 ? uint64_t{0} : static_cast<uint64_t>(v); };
  r->check_errors = u(c.check_errors);
  r->corruptions = u(c.corruptions);
  r->leaks = u(c.leaks);
  r->corruptions_fixed = u(c.corruptions_fixed);
  r->leaks_fixed = u(c.leaks_fixed);
  r->total_clusters = c.total_clusters;
  r->allocated_clusters = c.allocated_clusters;
  r->fragmented_clusters = c.fragmented_clusters;
  r->compressed_clusters = c.compressed_clusters;
  r->image_end_offset = c.image_end_offset;
}

// Opens the image the way QEMU does for a check: the header, and the bitmap
// directory (which QEMU loads at open and refuses when broken).
Status ParseForCheck(File* file, Qcow2Header* h) {
  DMCOW_RETURN_IF_ERROR(ParseQcow2Header(file, h, true));
  std::vector<BitmapInfo> bitmaps;
  return ReadQcow2Bitmaps(file, *h, &bitmaps);
}

Status CheckQcow2(File* file, const CheckOptions& options, CheckResult* result) {
  Qcow2Header h;
  DMCOW_RETURN_IF_ERROR(ParseForCheck(file, &h));
  result->opened = true;
  CheckReporter reporter(options, result);
  Qcow2CheckCounts counts;
  std::vector<std::pair<uint64_t, uint64_t>> changed;  // guest ranges the table fixes changed
  std::vector<std::string> bitmaps;                    // marked in use until their bits are set
  if (options.repair == RepairMode::kAll) {
    Qcow2Check tables(file, h, RepairMode::kAll, &reporter);
    Status s = tables.FixTables(&counts);
    if (!s.ok()) {
      CopyCounts(counts, result);
      return s;
    }
    changed = tables.changed_guest_ranges();
    bitmaps = tables.bitmaps_in_use();
    DMCOW_RETURN_IF_ERROR(ParseForCheck(file, &h));  // the autoclear bit may have changed
  }
  Qcow2CheckCounts run;
  Status s = Qcow2Check(file, h, options.repair, &reporter).Run(&run);
  counts.Add(run, true);
  CopyCounts(counts, result);
  if (!s.ok() || (counts.corruptions_fixed == 0 && counts.leaks_fixed == 0)) return s;

  // "Double checking the fixed image now...": the counts are the second
  // check's, with what was fixed.
  DMCOW_RETURN_IF_ERROR(ParseForCheck(file, &h));
  Qcow2CheckCounts again;
  s = Qcow2Check(file, h, RepairMode::kNone, &reporter).Run(&again);
  again.corruptions_fixed = counts.corruptions_fixed;
  again.leaks_fixed = counts.leaks_fixed;
  CopyCounts(again, result);
  result->rechecked = true;
  if (!s.ok() || again.corruptions || again.leaks || again.check_errors || bitmaps.empty()) return s;
  return Qcow2Check(file, h, RepairMode::kAll, &reporter).SetBitmapBits(changed, bitmaps);
}

}  // namespace

Status CheckImageFile(File* file, const CheckOptions& options, CheckResult* result) {
  *result = CheckResult();
  std::string format = options.format;
  if (format.empty()) {
    DMCOW_RETURN_IF_ERROR(ProbeImageFormat(file, &format));
    if (!IsSupportedFormat(format)) return UnsupportedFormat(file->name(), format);  // not opened: exit 1
  }
  result->format = format;
  if (format == "qcow2") return CheckQcow2(file, options, result);
  if (format == "qcow") return CheckQcow1(file, options, result);
  if (format == "raw") {
    result->opened = true;
    return Status::NotSupported("This image format does not support checks");
  }
  return Status::InvalidArgument("Unknown driver '" + format + "'");
}

Status CheckImage(const std::string& path, const CheckOptions& options, CheckResult* result) {
  *result = CheckResult();
  Env* env = options.env;
  std::unique_ptr<File> file;
  DMCOW_RETURN_IF_ERROR(
      env->OpenFile(path, options.repair == RepairMode::kNone ? OpenMode::kReadOnly : OpenMode::kReadWrite, &file));
  // A repair is a writer too: rule (8) of qcow2/qcow2_write.cc.
  if (options.repair != RepairMode::kNone) file = std::make_unique<FailStopFile>(std::move(file));
  return CheckImageFile(file.get(), options, result);
}

Status RepairDirtyQcow2(File* file, CheckResult* result) {
  *result = CheckResult();
  Qcow2Header h;
  DMCOW_RETURN_IF_ERROR(ParseQcow2Header(file, &h, true));
  if (!(h.incompatible_features & qcow2::kIncompatDirty)) return Status::OK();
  CheckOptions options;
  options.format = "qcow2";
  options.repair = RepairMode::kAll;
  DMCOW_RETURN_IF_ERROR(CheckImageFile(file, options, result));
  if (result->check_errors || result->corruptions) {
    return Status::Corrupt(file->name() + ": could not repair dirty image (" + std::to_string(result->corruptions) +
                           " corruptions, " + std::to_string(result->check_errors) + " internal errors left)");
  }
  return Status::OK();
}

}  // namespace dmcow
