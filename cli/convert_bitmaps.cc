#include "convert_bitmaps.h"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <vector>

#include "cli_common.h"

namespace dmcow::cli {
namespace {

bool HoldsBitmaps(const Image& image) { return image.info().format == "qcow2" && image.info().version >= 3; }

}  // namespace

bool CheckSourceBitmaps(const Image& source, bool skip_broken) {
  if (!HoldsBitmaps(source)) {
    PrintError("Source lacks bitmap support");
    return false;
  }
  if (skip_broken) return true;
  // QEMU walks a node's bitmaps newest first: the directory backwards.
  const std::vector<BitmapInfo>& bitmaps = source.info().bitmaps;
  for (auto it = bitmaps.rbegin(); it != bitmaps.rend(); ++it) {
    if (it->in_use) {
      PrintError("Cannot copy inconsistent bitmap '" + it->name + "'");
      std::fprintf(stderr, "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it\n");
      return false;
    }
  }
  return true;
}

bool CheckTargetTakesBitmaps(const Image& target) {
  if (HoldsBitmaps(target)) return true;
  PrintError("Format driver '" + target.info().format + "' does not support bitmaps");
  return false;
}

bool CopyBitmaps(Image* source, const std::string& target_path, Env* env, const std::vector<BitmapInfo>& target_had) {
  const std::vector<BitmapInfo>& bitmaps = source->info().bitmaps;
  // Warnings and the first clash in QEMU's order (newest first)...
  for (auto it = bitmaps.rbegin(); it != bitmaps.rend(); ++it) {
    if (it->in_use) {
      std::fprintf(stderr, "%s: warning: Skipping inconsistent bitmap '%s'\n", kProgName, it->name.c_str());
      continue;
    }
    const auto same_name = [&](const BitmapInfo& b) { return b.name == it->name; };
    if (std::any_of(target_had.begin(), target_had.end(), same_name)) {
      PrintError("Failed to create bitmap " + it->name + ": Bitmap already exists: " + it->name);
      return false;
    }
  }
  OpenOptions options;
  options.format = "qcow2";
  options.writable = true;
  options.metadata_only = true;       // the other bitmaps stay valid
  options.allow_missing_keys = true;  // no guest data is read or written
  options.open_backing = false;
  options.env = env;
  std::unique_ptr<Image> target;
  if (!OpenImageOrReport(target_path, options, &target).ok()) return false;
  // ...then the adds in directory order, which QEMU's store keeps too.
  for (const BitmapInfo& b : bitmaps) {
    if (b.in_use) continue;
    std::vector<BitmapAction> actions(1);
    actions[0].kind = BitmapAction::Kind::kAdd;
    actions[0].granularity = b.granularity;
    if (!b.auto_flag) actions.emplace_back().kind = BitmapAction::Kind::kDisable;
    BitmapAction& merge = actions.emplace_back();
    merge.kind = BitmapAction::Kind::kMerge;
    merge.source = source;
    merge.source_name = b.name;
    size_t failed = actions.size();
    const Status s = target->ChangeBitmap(b.name, actions, &failed);
    if (!s.ok()) {
      PrintError(std::string(failed == 0 ? "Failed to create bitmap " : "Failed to populate bitmap ") + b.name + ": " +
                 MessageWithoutPath(target_path, s));
      if (failed != 0) {  // as QEMU, the half-made bitmap goes
        std::vector<BitmapAction> remove(1);
        remove[0].kind = BitmapAction::Kind::kRemove;
        (void)target->ChangeBitmap(b.name, remove, nullptr);
      }
      return false;
    }
  }
  const Status s = target->Flush();
  if (!s.ok()) PrintError(s.ToString());
  return s.ok();
}

}  // namespace dmcow::cli
