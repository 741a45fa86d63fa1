// dmcow-img info: qemu-img info (block/qapi.c bdrv_image_info_dump and the
// ImageInfo QAPI type) for raw, qcow and qcow2 images.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <ctime>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_common.h"
#include "locking_env.h"
#include "qemu_json.h"

namespace dmcow::cli {
namespace {

// QCryptoBlockInfo: the format and, for LUKS, its header (QCryptoBlockInfoLUKS).
Json EncryptionJson(const EncryptionInfo& e) {
  Json j = Json::object();
  j["format"] = e.format;
  if (e.format != "luks") return j;
  j["cipher-alg"] = e.cipher_alg;
  j["cipher-mode"] = e.cipher_mode;
  j["ivgen-alg"] = e.ivgen_alg;
  if (!e.ivgen_hash_alg.empty()) j["ivgen-hash-alg"] = e.ivgen_hash_alg;
  j["hash-alg"] = e.hash_alg;
  j["payload-offset"] = e.payload_offset;
  j["master-key-iters"] = e.master_key_iterations;
  j["uuid"] = e.uuid;
  Json slots = Json::array();
  for (const LuksSlotInfo& s : e.slots) {
    Json slot = Json::object();
    slot["active"] = s.active;
    if (s.active) slot["iters"] = s.iterations;
    if (s.active) slot["stripes"] = s.stripes;
    slot["key-offset"] = s.key_offset;
    slots.push_back(slot);
  }
  j["slots"] = slots;
  return j;
}

// ImageInfoSpecificQCow2 in schema order; null when qemu prints none.
Json FormatSpecificJson(const ImageInfo& info) {
  if (info.format != "qcow2") return nullptr;
  Json data = Json::object();
  const std::string compression = info.compression_type.empty() ? "zlib" : info.compression_type;
  if (info.version < 3) {
    data["compat"] = "0.10";
    data["refcount-bits"] = info.refcount_bits;
    data["compression-type"] = compression;
  } else {
    data["compat"] = "1.1";
    if (!info.data_file.empty()) {
      data["data-file"] = info.data_file;
      data["data-file-raw"] = info.data_file_raw;
    }
    data["extended-l2"] = info.extended_l2;
    data["lazy-refcounts"] = info.lazy_refcounts;
    data["corrupt"] = info.corrupt;
    data["refcount-bits"] = info.refcount_bits;
    if (!info.bitmaps.empty()) {
      Json bitmaps = Json::array();
      for (const BitmapInfo& b : info.bitmaps) {
        Json flags = Json::array();
        if (b.in_use) flags.push_back("in-use");
        if (b.auto_flag) flags.push_back("auto");
        Json bitmap = Json::object();
        bitmap["name"] = b.name;
        bitmap["granularity"] = b.granularity;
        bitmap["flags"] = flags;
        bitmaps.push_back(bitmap);
      }
      data["bitmaps"] = bitmaps;
    }
    data["compression-type"] = compression;
  }
  if (!info.encryption.format.empty()) data["encrypt"] = EncryptionJson(info.encryption);
  Json spec = Json::object();
  spec["type"] = "qcow2";
  spec["data"] = data;
  return spec;
}

// The ImageInfo QAPI object, members in schema order.
Json ImageInfoJson(const Image& image) {
  const ImageInfo& info = image.info();
  Json j = Json::object();
  j["filename"] = image.filename();
  j["format"] = info.format;
  j["dirty-flag"] = info.dirty;
  j["actual-size"] = image.AllocatedFileBytes();
  j["virtual-size"] = info.virtual_size;
  if (info.cluster_size != 0) j["cluster-size"] = info.cluster_size;
  if (info.encrypted) j["encrypted"] = true;
  if (!info.backing_filename.empty()) {
    j["backing-filename"] = info.backing_filename;
    if (!info.full_backing_filename.empty()) j["full-backing-filename"] = info.full_backing_filename;
    if (!info.backing_format.empty()) j["backing-filename-format"] = info.backing_format;
  }
  if (!info.snapshots.empty()) {
    Json snapshots = Json::array();
    for (const SnapshotInfo& sn : info.snapshots) {
      Json s = Json::object();
      s["id"] = sn.id;
      s["name"] = sn.name;
      s["vm-state-size"] = sn.vm_state_size;
      s["date-sec"] = sn.date_sec;
      s["date-nsec"] = sn.date_nsec;
      s["vm-clock-sec"] = sn.vm_clock_nsec / 1000000000;
      s["vm-clock-nsec"] = sn.vm_clock_nsec % 1000000000;
      if (sn.has_icount) s["icount"] = sn.icount;
      snapshots.push_back(s);
    }
    j["snapshots"] = snapshots;
  }
  Json spec = FormatSpecificJson(info);
  if (!spec.is_null()) j["format-specific"] = spec;
  return j;
}

// block/qapi.c bdrv_image_info_dump().
void PrintHuman(const Image& image) {
  const ImageInfo& info = image.info();
  std::printf("image: %s\nfile format: %s\nvirtual size: %s (%" PRIu64 " bytes)\ndisk size: %s\n",
              image.filename().c_str(), info.format.c_str(), SizeToStr(info.virtual_size).c_str(), info.virtual_size,
              SizeToStr(image.AllocatedFileBytes()).c_str());
  if (info.encrypted) std::printf("encrypted: yes\n");
  if (info.cluster_size != 0) std::printf("cluster_size: %" PRIu64 "\n", info.cluster_size);
  if (info.dirty) std::printf("cleanly shut down: no\n");
  if (!info.backing_filename.empty()) {
    std::printf("backing file: %s", info.backing_filename.c_str());
    if (info.full_backing_filename.empty()) {
      std::printf(" (cannot determine actual path)");
    } else if (info.full_backing_filename != info.backing_filename) {
      std::printf(" (actual path: %s)", info.full_backing_filename.c_str());
    }
    std::printf("\n");
    if (!info.backing_format.empty()) std::printf("backing file format: %s\n", info.backing_format.c_str());
  }
  PrintSnapshotList(info.snapshots);
  Json spec = FormatSpecificJson(info);
  if (!spec.is_null()) {
    std::printf("Format specific information:\n%s", QemuHumanDump(spec["data"], 1).c_str());
  }
}

// info's command line, as ParseInfo reads it.
struct InfoArgs {
  std::string format;              // -f, --format
  std::string output = "human";    // --output
  bool chain = false;              // --backing-chain
  bool force_share = false;        // -U, --force-share
  bool image_opts = false;         // --image-opts
  std::vector<std::string> files;  // FILE
};

// Reads info's command line into *args (CLI11, ParseCommandLine): an exit
// code when the command ends there (--help, a bad command line).
std::optional<int> ParseInfo(int argc, char** argv, InfoArgs* args) {
  CLI::App app{"Give information about the disk image FILE.", "dmcow-img info"};
  app.add_option("-f,--format", args->format, "Image format (raw, qcow, qcow2); probed if omitted");
  app.add_option("--output", args->output, "human or json");
  app.add_flag("--backing-chain", args->chain, "Show every image of the backing chain");
  AddImageArguments(app, &args->force_share, &args->image_opts, &args->files);
  return ParseCommandLine(app, argc, argv);
}

// Runs info as args says; returns the exit code.
int RunInfo(const InfoArgs& args) {
  bool json = false;
  if (!ParseOutputFormat(args.output, &json)) return 1;
  if (args.files.size() != 1) return UsageError("Expecting one image file name");
  if (ImageOptsWithFormat(args.image_opts, args.format)) return 1;
  std::string top_path;
  OpenOptions top_options;
  top_options.allow_missing_keys = true;  // info shows what needs no key
  if (!ImageArgument(args.files[0], args.image_opts, &top_path, &top_options)) return 1;
  std::string format = args.image_opts ? top_options.format : args.format;  // of the image opened next

  // Like qemu-img, every image is opened on its own, without its backing
  // file, following the resolved backing file name from one to the next.
  // A loop is found by the file's identity as well as by its name: names
  // alone miss a hard link, and "./img" resolved from "dir/img" gives a new
  // name ("dir/./img", "dir/././img", ...) at every step of the same loop.
  std::vector<std::unique_ptr<LockingEnv>> envs;  // one per image: each is the one named, as in qemu-img
  std::vector<std::unique_ptr<Image>> images;
  std::set<std::string> seen;
  std::vector<FileIdentity> seen_files;
  std::string filename = top_path;
  while (!filename.empty()) {
    FileIdentity id;
    std::unique_ptr<File> file;
    const bool has_id = Env::Default()->OpenFile(filename, OpenMode::kReadOnly, &file).ok() && file->Identity(&id).ok();
    file.reset();
    const bool seen_id = has_id && std::find(seen_files.begin(), seen_files.end(), id) != seen_files.end();
    if (!seen.insert(filename).second || seen_id) {
      PrintError("Backing file '" + filename + "' creates an infinite loop.");
      return 1;
    }
    if (has_id) seen_files.push_back(id);
    envs.push_back(std::make_unique<LockingEnv>(Env::Default(),
                                                LockingEnv::Policy{filename, LockingEnv::ReadMode(args.force_share)}));
    OpenOptions options;
    options.format = format;
    options.open_backing = false;
    options.open_data_file = false;  // as qemu-img info: only its name is shown
    options.allow_missing_keys = true;
    options.env = envs.back().get();
    std::unique_ptr<Image> image;
    Status s = OpenImage(filename, options, &image);
    if (!s.ok()) {
      std::string msg = s.ToString();
      // A backing file refused for what it is (a FIFO, a socket, a
      // character device) is named with the image that names it, as the
      // other commands do; a missing one keeps qemu-img's wording.
      if (!images.empty() && msg.find(", not a regular file or block device") != std::string::npos) {
        const std::string prefix = filename + ": ";
        msg = images.back()->filename() + ": could not open backing file '" + filename +
              "': " + (msg.rfind(prefix, 0) == 0 ? msg.substr(prefix.size()) : msg);
      }
      PrintError("Could not open '" + (images.empty() ? args.files[0] : filename) + "': " + msg);
      return 1;
    }
    const ImageInfo& info = image->info();
    filename.clear();
    format.clear();
    if (args.chain && !info.backing_filename.empty()) {
      if (info.full_backing_filename.empty()) {
        PrintError("Could not determine absolute backing filename, but backing filename '" + info.backing_filename +
                   "' present");
        return 1;
      }
      filename = info.full_backing_filename;
      format = info.backing_format;
    }
    images.push_back(std::move(image));
  }

  if (json) {
    Json out;
    if (args.chain) {
      out = Json::array();
      for (const auto& image : images) out.push_back(ImageInfoJson(*image));
    } else {
      out = ImageInfoJson(*images[0]);
    }
    std::printf("%s\n", QemuJsonPretty(out).c_str());
  } else {
    for (size_t i = 0; i < images.size(); i++) {
      if (i > 0) std::printf("\n");
      PrintHuman(*images[i]);
    }
  }
  return 0;
}

}  // namespace

int CmdInfo(int argc, char** argv) { return ParseAndRun(argc, argv, ParseInfo, RunInfo); }

}  // namespace dmcow::cli
