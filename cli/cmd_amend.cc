// dmcow-img amend: qemu-img amend, changing a qcow2 image's options in place.
//
//   amend [--object OBJ] [--image-opts] [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTIONS FILE
//
// Options, messages and exit codes as qemu-img 7.2's: the -o list is
// validated in QEMU's table order, then applied in QEMU's order (upgrade,
// refcount width, backing file check, lazy refcounts, size, downgrade), and
// like QEMU a failure part way keeps what was already applied. The engine
// does the work (Image::ChangeVersion, ChangeRefcountBits, SetLazyRefcounts,
// Grow, Shrink; qcow/src/qcow2/qcow2_amend.cc states their crash-safe order).
// The image is opened so that persistent bitmaps stay valid (no amend option
// changes guest content). Not done: LUKS keyslots (encrypt.*), changing the
// external data file's name or its raw flag; they are refused, nothing
// changed.
#include <getopt.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cli_common.h"
#include "image_options.h"
#include "locking_env.h"
#include "object_option.h"

namespace dmcow::cli {
namespace {

// amend's command line, as ParseAmend reads it.
struct AmendArgs {
  std::string options;   // the -o lists, joined
  std::string format;    // -f
  std::string cache;     // -t
  std::string filename;  // FILE, when exactly one was given
  size_t files = 0;
  bool has_options = false;
  bool progress = false;  // -p (off with -q)
  bool image_opts = false;
};

void PrintUsage() {
  std::printf(
      "usage: %s amend [--object OBJ] [--image-opts] [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTIONS FILE\n\n"
      "Changes a qcow2 image's options in place: compat, refcount_bits, lazy_refcounts, size.\n"
      "'-o help' lists them.\n",
      kProgName);
}

std::optional<int> ParseAmend(int argc, char** argv, AmendArgs* args) {
  enum { kImageOpts = 256, kForce };
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"object", required_argument, nullptr, kObjectOption},
                                        {"image-opts", no_argument, nullptr, kImageOpts},
                                        {"force", no_argument, nullptr, kForce},
                                        {nullptr, 0, nullptr, 0}};
  bool quiet = false;
  std::vector<std::string> operands;
  auto on_option = [&](int c, const char* arg) -> std::optional<int> {
    switch (c) {
      case 'h': PrintUsage(); return 0;
      case 'o':
        if (!AppendOptionList(arg, &args->options)) return 1;
        args->has_options = true;
        break;
      case 'f': args->format = arg; break;
      case 't': args->cache = arg; break;
      case 'p': args->progress = true; break;
      case 'q': quiet = true; break;
      case kImageOpts: args->image_opts = true; break;
      case kForce: break;  // only LUKS keyslot changes use it
    }
    return std::nullopt;
  };
  if (auto rc = ParseGetopt(argc, argv, ":ho:f:t:pq", kLong, on_option, &operands)) return rc;
  if (!args->has_options) return UsageError("Must specify options (-o)");
  if (quiet) args->progress = false;
  args->files = operands.size();
  if (operands.size() == 1) args->filename = std::move(operands[0]);
  return std::nullopt;
}

// The values of a parsed -o list that amend acts on (0 / nullopt: not given).
struct Amendments {
  uint64_t size = 0;  // QEMU takes size=0 for "not given"
  std::optional<uint32_t> version;
  std::optional<std::string> backing_file, backing_format;
  std::optional<bool> lazy_refcounts;
  std::optional<uint32_t> refcount_bits;
  std::optional<KeySlotChange> key_slots;  // encrypt.* (LUKS)
  std::string missing_secret;              // a secret id named but not given (--object)
};

// QEMU's validation pass (qcow2_amend_options' loop over its table): ""
// or the message of the first bad value.
std::string Validate(const OptionSet& set, const Image& image, Amendments* out) {
  const ImageInfo& info = image.info();
  for (const OptDesc* d = Qcow2AmendOptions().begin; d != Qcow2AmendOptions().end; d++) {
    auto it = set.find(d->name);
    if (it == set.end()) continue;
    const std::string name = d->name;
    const SetOption& value = it->second;
    if (name.rfind("encrypt.", 0) == 0) {
      if (!info.encrypted) return "Can't amend encryption options - encryption not present";
      if (info.encryption.format != "luks") return "Only LUKS encryption options can be amended";
      if (!out->key_slots) out->key_slots.emplace();
      KeySlotChange& k = *out->key_slots;
      auto secret = [&](const std::string** to) {
        *to = FindSecret(value.raw);
        if (*to == nullptr && out->missing_secret.empty())
          out->missing_secret = "No secret with id '" + value.raw + "'";
      };
      if (name == "encrypt.state") {
        if (value.raw != "active" && value.raw != "inactive") {
          return "Parameter 'state' does not accept value '" + value.raw + "'";
        }
        k.activate = value.raw == "active";
      } else if (name == "encrypt.keyslot") {
        k.has_keyslot = true;
        k.keyslot = static_cast<int64_t>(value.number);
      } else if (name == "encrypt.old-secret") {
        secret(&k.old_secret);
      } else if (name == "encrypt.new-secret") {
        secret(&k.new_secret);
      } else if (name == "encrypt.iter-time") {
        k.iter_time_ms = value.number;
      }
    } else if (name == "size") {
      out->size = value.number;
    } else if (name == "compat") {
      if (value.raw == "0.10" || value.raw == "v2") {
        out->version = 2;
      } else if (value.raw == "1.1" || value.raw == "v3") {
        out->version = 3;
      } else {
        return "Unknown compatibility level " + value.raw;
      }
    } else if (name == "backing_file") {
      out->backing_file = value.raw;
    } else if (name == "backing_fmt") {
      out->backing_format = value.raw;
    } else if (name == "data_file") {
      if (info.data_file.empty()) return "data-file can only be set for images that use an external data file";
      return "changing the external data file's name is not supported yet";
    } else if (name == "data_file_raw") {
      bool raw = false;
      ParseBool(value.raw, &raw);
      if (raw && !info.data_file_raw) return "data-file-raw cannot be set on existing images";
      if (!raw && info.data_file_raw) return "clearing data_file_raw is not supported yet";
    } else if (name == "lazy_refcounts") {
      bool on = false;
      ParseBool(value.raw, &on);
      out->lazy_refcounts = on;
    } else if (name == "refcount_bits") {
      const uint64_t bits = value.number;
      if (bits == 0 || bits > 64 || (bits & (bits - 1)) != 0) {
        return "Refcount width must be a power of two and may not exceed 64 bits";
      }
      out->refcount_bits = static_cast<uint32_t>(bits);
    }
  }
  if (out->key_slots && set.count("encrypt.state") == 0) return "Parameter 'state' is missing";
  return out->missing_secret;
}

// QEMU's qcow2_amend_helper_cb: the reports of the steps that report
// (version change, refcount width) as one line, each step's total work
// projected onto those still to come.
class ProgressOfSteps {
 public:
  ProgressOfSteps(Progress* line, int steps) : line_(line), steps_(steps) {}
  AmendProgress For(int step) {
    return [this, step](uint64_t done, uint64_t total) { Report(step, done, total); };
  }

 private:
  void Report(int step, uint64_t done, uint64_t total) {
    if (step != last_step_) {
      if (last_step_ != 0) {
        offset_completed_ += last_total_;
        steps_completed_++;
      }
      last_step_ = step;
    }
    last_total_ = static_cast<int64_t>(total);
    const int64_t current = offset_completed_ + last_total_;
    const int64_t projected = current * (steps_ - steps_completed_ - 1) / (steps_completed_ + 1);
    line_->Set(100.f * static_cast<float>(offset_completed_ + static_cast<int64_t>(done)) /
               static_cast<float>(current + projected));
  }

  Progress* line_;
  int64_t steps_;
  int last_step_ = 0;
  int64_t steps_completed_ = 0, offset_completed_ = 0, last_total_ = 0;
};

// QEMU's execution pass: "" or the message of the step that failed (the
// steps before it stay applied, as in QEMU).
std::string Apply(const Amendments& a, const std::string& path, Image* image, Progress* line) {
  const ImageInfo& info = image->info();
  const uint32_t old_version = info.version;
  const uint32_t new_version = a.version.value_or(old_version);
  const bool new_width = a.refcount_bits && *a.refcount_bits != info.refcount_bits;
  enum { kVersionStep = 1, kWidthStep };
  ProgressOfSteps progress(line, (new_version != old_version) + new_width);
  auto failed = [&](const Status& s) { return s.ok() ? std::string() : MessageWithoutPath(path, s); };
  if (a.key_slots) {
    if (std::string why = failed(image->ChangeKeySlots(*a.key_slots)); !why.empty()) return why;
  }
  if (new_version > old_version) {
    if (std::string why = failed(image->ChangeVersion(new_version, progress.For(kVersionStep))); !why.empty()) {
      return why;
    }
  }
  if (new_width) {
    if (new_version < 3 && *a.refcount_bits != 16) {
      return "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or "
             "greater)";
    }
    const Status s = image->ChangeRefcountBits(*a.refcount_bits, progress.For(kWidthStep));
    if (std::string why = failed(s); !why.empty()) return why;
  }
  if (a.backing_file || a.backing_format) {
    // Both must name what the header holds (QEMU compares each, an absent
    // one with a value given as well): amend never changes them.
    auto current = [](const std::string& v) { return v.empty() ? std::nullopt : std::optional<std::string>(v); };
    if (a.backing_file != current(info.backing_filename) || a.backing_format != current(info.backing_format)) {
      return "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.";
    }
  }
  if (a.lazy_refcounts && *a.lazy_refcounts != info.lazy_refcounts) {
    if (*a.lazy_refcounts && new_version < 3) {
      return "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)";
    }
    if (std::string why = failed(image->SetLazyRefcounts(*a.lazy_refcounts)); !why.empty()) return why;
  }
  if (a.size != 0 && a.size != image->virtual_size()) {
    if (a.size % 512 != 0) return "The new size must be a multiple of 512";
    if (old_version < 3 && new_version < 3 && !info.snapshots.empty()) {
      return "Can't resize a v2 image which has snapshots";
    }
    const Status s = a.size < image->virtual_size() ? image->Shrink(a.size) : image->Grow(a.size);
    if (std::string why = failed(s); !why.empty()) return why;
  }
  if (new_version < old_version) {
    if (std::string why = failed(image->ChangeVersion(new_version, progress.For(kVersionStep))); !why.empty()) {
      return why;
    }
  }
  return failed(image->Flush());
}

int RunAmend(const AmendArgs& args) {
  Progress progress(args.progress, 1.0f);
  // From here on every exit ends the progress line (qemu-img's "out:").
  auto finish = [&](int rc) {
    progress.End();
    return rc;
  };
  if (!args.format.empty() && HasHelpOption(args.options)) return finish(PrintAmendHelp(args.format));
  if (args.files != 1) {
    PrintError("Expecting one image file name");
    return finish(1);
  }
  if (!args.cache.empty() && !ValidCacheMode(args.cache)) {
    PrintError("Invalid cache option: " + args.cache);
    return finish(1);
  }
  if (ImageOptsWithFormat(args.image_opts, args.format)) return finish(1);
  OpenOptions options;
  options.format = args.format;
  std::string path;
  if (!ImageArgument(args.filename, args.image_opts, &path, &options)) return finish(1);
  LockingEnv env(Env::Default(), {path, ImageLock::Mode::kReadOnly});
  options.env = &env;
  options.writable = true;
  options.metadata_only = true;  // no amend option changes guest content: bitmaps stay valid
  std::unique_ptr<Image> image;
  if (!OpenImageOrReport(args.filename, path, options, &image).ok()) return finish(1);
  if (args.format.empty()) WarnIfProbedRaw(*image, path);
  const std::string& format = image->info().format;
  if (HasHelpOption(args.options)) return finish(PrintAmendHelp(format));
  if (format != "qcow2") {
    PrintError("Format driver '" + format + "' does not support option amendment");
    return finish(1);
  }
  OptionSet set;
  if (std::string error = ParseOptionList(Qcow2AmendOptions(), {}, args.options, &set); !error.empty()) {
    // A creation option (cluster_size...): QEMU's hint, when the whole list
    // reads as amend and create options together.
    OptList create;
    FindFormat("qcow2", &create);
    OptionSet both;
    if (ParseOptionList(Qcow2AmendOptions(), std::vector<OptDesc>(create.begin, create.end), args.options, &both)
            .empty()) {
      error += "\nThis option is only supported for image creation";
    }
    PrintError(error);
    return finish(1);
  }
  progress.Set(0);
  Amendments amendments;
  std::string why = Validate(set, *image, &amendments);
  if (why.empty()) why = Apply(amendments, path, image.get(), &progress);
  progress.Set(100);
  if (!why.empty()) {
    PrintError(why);
    return finish(1);
  }
  return finish(0);
}

}  // namespace

int CmdAmend(int argc, char** argv) { return ParseAndRun(argc, argv, ParseAmend, RunAmend); }

}  // namespace dmcow::cli
