// dmcow-img snapshot: qemu-img snapshot, the internal snapshots of qcow2
// images.
//
//   snapshot [--object OBJ] [--image-opts] [-U] [-q] [-l | -a NAME | -c NAME | -d NAME] FILE
//
// Options, output (-l prints the table info prints), messages and exit codes
// as qemu-img 7.2's. The engine does the work (Image::CreateSnapshot,
// DeleteSnapshot, ApplySnapshot; qcow/src/qcow2/qcow2_snapshot.cc states
// their crash-safe order).
#include <getopt.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "image_options.h"
#include "locking_env.h"
#include "object_option.h"

namespace dmcow::cli {
namespace {

// qemu-img copies the name into QEMUSnapshotInfo's char[256].
constexpr size_t kMaxNameBytes = 255;

enum class Action { kNone, kList, kApply, kCreate, kDelete };

// snapshot's command line, as ParseSnapshot reads it.
struct SnapshotArgs {
  Action action = Action::kNone;
  std::string name;          // -a, -c, -d
  std::string filename;      // FILE
  bool quiet = false;        // -q
  bool force_share = false;  // -U
  bool image_opts = false;   // --image-opts
};

void PrintUsage() {
  std::printf(
      "usage: %s snapshot [--image-opts] [-U] [-q] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE\n\n"
      "Lists (-l), applies (-a), creates (-c) or deletes (-d) the internal snapshots of a qcow2 image.\n"
      "-a takes a snapshot's id or name, -d its name.\n",
      kProgName);
}

std::optional<int> ParseSnapshot(int argc, char** argv, SnapshotArgs* args) {
  enum { kImageOpts = 256 };
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"object", required_argument, nullptr, kObjectOption},
                                        {"image-opts", no_argument, nullptr, kImageOpts},
                                        {"force-share", no_argument, nullptr, 'U'},
                                        {nullptr, 0, nullptr, 0}};
  std::vector<std::string> operands;
  auto set_action = [&](Action action, const char* name) -> std::optional<int> {
    if (args->action != Action::kNone) return UsageError("Cannot mix '-l', '-a', '-c', '-d'");
    args->action = action;
    if (name != nullptr) args->name = name;
    return std::nullopt;
  };
  auto on_option = [&](int c, const char* arg) -> std::optional<int> {
    switch (c) {
      case 'h': PrintUsage(); return 0;
      case 'l': return set_action(Action::kList, nullptr);
      case 'a': return set_action(Action::kApply, arg);
      case 'c': return set_action(Action::kCreate, arg);
      case 'd': return set_action(Action::kDelete, arg);
      case 'q': args->quiet = true; break;
      case 'U': args->force_share = true; break;
      case kImageOpts: args->image_opts = true; break;
    }
    return std::nullopt;
  };
  if (auto rc = ParseGetopt(argc, argv, ":la:c:d:hqU", kLong, on_option, &operands)) return rc;
  if (operands.size() != 1) return UsageError("Expecting one image file name");
  args->filename = operands[0];
  return std::nullopt;
}

// What follows "Could not create snapshot 'NAME': ": qemu-img's "-ERRNO
// (text)" for its refusals; for damage found (a hostile table) or an I/O
// error, the engine's message, which says what and where.
std::string CreateFailure(const std::string& path, const Status& s) {
  int err = 0;
  if (s.IsNotSupported()) err = ENOTSUP;
  if (s.code() == Status::Code::kInvalidArgument) err = EINVAL;
  if (s.IsNoSpace()) err = EFBIG;
  if (err == 0) return MessageWithoutPath(path, s);
  return std::to_string(-err) + " (" + std::strerror(err) + ")";
}

int RunSnapshot(const SnapshotArgs& args) {
  const bool list = args.action == Action::kList;
  OpenOptions options;
  std::string path;
  if (!ImageArgument(args.filename, args.image_opts, &path, &options)) return 1;
  if (args.force_share && !list) {
    PrintError("Could not open '" + args.filename + "': force-share=on can only be used with read-only images");
    return 1;
  }
  LockingEnv env(Env::Default(), {path, LockingEnv::ReadMode(args.force_share)});
  options.env = &env;
  // qemu-img opens for writing unless listing; with no action it writes
  // nothing, so the header-only open (nothing changes, bitmaps stay valid).
  options.writable = !list;
  options.header_only = args.action == Action::kNone;
  // Creating and deleting change no guest byte: persistent bitmaps stay
  // valid, as with qemu-img. Applying one changes the content, which
  // qemu-img refuses while the image has bitmaps: the open must not touch
  // them before that refusal.
  options.metadata_only = args.action != Action::kNone;
  std::unique_ptr<Image> image;
  if (!OpenImageOrReport(args.filename, path, options, &image).ok()) return 1;
  // The probe's warning is for writers (qemu-img's -l does not print it).
  if (options.format.empty() && !list) WarnIfProbedRaw(*image, path);

  const std::string& name = args.name;
  // "Could not VERB snapshot 'NAME': WHY", exit 1; nothing for an empty WHY.
  auto failed = [&](const char* verb, const std::string& why) {
    if (why.empty()) return 0;
    PrintError(std::string("Could not ") + verb + " snapshot '" + name + "': " + why);
    return 1;
  };
  // The change, then the flush that makes it durable.
  auto done = [&](Status s) {
    if (s.ok()) s = image->Flush();
    return s;
  };
  switch (args.action) {
    case Action::kNone: return 0;
    case Action::kList: PrintSnapshotList(image->info().snapshots); return 0;
    case Action::kCreate: {
      SnapshotInfo sn;
      sn.name = name.substr(0, kMaxNameBytes);
      struct timespec now;
      clock_gettime(CLOCK_REALTIME, &now);
      sn.date_sec = static_cast<uint32_t>(now.tv_sec);
      sn.date_nsec = static_cast<uint32_t>(now.tv_nsec / 1000 * 1000);  // microseconds, as g_get_real_time
      sn.has_icount = true;
      const Status s = done(image->CreateSnapshot(&sn));
      return failed("create", s.ok() ? "" : CreateFailure(path, s));
    }
    case Action::kApply: {
      if (image->info().format != "qcow2") {
        // qemu-img reopens the image after trying its file: the warning again.
        if (options.format.empty()) WarnIfProbedRaw(*image, path);
        return failed("apply", "Block driver does not support snapshots");
      }
      // qemu-img's first check (bdrv_snapshot_goto), before the name.
      if (!image->info().bitmaps.empty()) return failed("apply", "Device has active dirty bitmaps");
      const SnapshotInfo* sn = FindSnapshot(image->info().snapshots, name);
      if (sn == nullptr) return failed("apply", "Failed to load snapshot: No such file or directory");
      const Status s = done(image->ApplySnapshot(sn->id));
      return failed("apply", s.ok() ? "" : MessageWithoutPath(path, s));
    }
    case Action::kDelete: {
      // By name only, the first with it (qemu-img's bdrv_snapshot_find);
      // -a takes an id too.
      const SnapshotInfo* sn = nullptr;
      for (const SnapshotInfo& s : image->info().snapshots) {
        if (sn == nullptr && s.name == name) sn = &s;
      }
      if (sn == nullptr) return failed("delete", "snapshot not found");
      const Status s = done(image->DeleteSnapshot(sn->id));
      return failed("delete", s.ok() ? "" : MessageWithoutPath(path, s));
    }
  }
  return 0;
}

}  // namespace

int CmdSnapshot(int argc, char** argv) { return ParseAndRun(argc, argv, ParseSnapshot, RunSnapshot); }

}  // namespace dmcow::cli
