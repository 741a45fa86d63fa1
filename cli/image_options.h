// The -o option lists of qemu-img create and convert: each format's
// options (names, types, defaults, help, in qemu-img's order), parsing as
// qemu_opts_do_parse does, and their translation to CreateOptions.
#ifndef DMCOW_CLI_IMAGE_OPTIONS_H_
#define DMCOW_CLI_IMAGE_OPTIONS_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "dmcow/create.h"
#include "dmcow/image.h"

namespace dmcow::cli {

enum class OptType { kString, kSize, kNumber, kBool };

struct OptDesc {
  const char* name;
  OptType type;
  const char* def;  // printed when not set; nullptr: not printed
  const char* help;
  bool protocol;  // file-posix's option, listed in help only with a FILE
};

struct OptList {
  const OptDesc* begin;
  const OptDesc* end;
};

struct SetOption {
  std::string raw;      // as given
  uint64_t number = 0;  // parsed, for size and number options
};
using OptionSet = std::map<std::string, SetOption>;

// The options of "qcow2", "qcow" or "raw"; false for another format.
bool FindFormat(const std::string& fmt, OptList* list);

// qemu-img's print_block_option_help; returns the exit code.
int PrintOptionHelp(const char* filename, const std::string& fmt);

// qemu-img amend's options for qcow2 (the only format dmcow-img amends), in
// QEMU's table order.
OptList Qcow2AmendOptions();

// qemu-img amend's "-o help" for `fmt`; returns the exit code.
int PrintAmendHelp(const std::string& fmt);

// qemu-img's is_valid_option_list.
bool IsValidOptionList(const char* s);

// One -o of create or convert, as qemu-img's accumulate_options: `list`
// is appended to *options (a ',' between), so that repeated -o options
// combine and a later value of a name wins. False, with qemu-img's
// "Invalid option list" printed, if `list` is not a valid list.
bool AppendOptionList(const char* list, std::string* options);

// Splits "a=1,b=x,,y" into {a,1},{b,"x,y"}; a name without '=' gets "on".
std::vector<std::pair<std::string, std::string>> SplitOptions(const std::string& list);
bool HasHelpOption(const std::string& list);

bool ParseBool(const std::string& v, bool* out);
bool ParseNumber(const std::string& v, uint64_t* out);

// True if `text` is written as a size even if out of range.
bool LooksLikeSize(const std::string& text);

// qemu's message for a bad value of size parameter `name`: out of range
// when `value` is written as a size, else not a size (three lines, with the
// suffixes).
std::string BadSizeParameter(const std::string& name, const std::string& value);

// "a,b" as a -o value: commas doubled.
std::string Escaped(const std::string& v);

// Parses `options` against `list` plus `extra` (names a command accepts
// beyond the format's own), checking each value's type; the last value of a
// name wins. Returns "" or qemu-img's message for the first bad option.
std::string ParseOptionList(const OptList& list, const std::vector<OptDesc>& extra, const std::string& options,
                            OptionSet* set);

// Copies the format options in `set` into *co (size excluded); the
// secret encrypt.key-secret names is looked up (object_option.h).
void FillCreateOptions(const OptionSet& set, CreateOptions* co);

// QEMU's "No secret with id 'ID'" when encrypt.key-secret names no
// secret; "" otherwise.
std::string MissingSecret(const OptionSet& set);

// Whether QEMU has a block driver of this name that dmcow-img does not
// open (vmdk, nbd...): "unsupported" rather than qemu's "Unknown driver".
bool QemuHasDriver(const std::string& driver);

// qemu-img's --image-opts: an image named by options instead of a file
// name, e.g. "driver=qcow2,file.filename=vm.qcow2,backing=null". Accepted:
// driver (raw, qcow, qcow2; probed if absent), file.filename, file.driver
// (file), and backing: "null" or "" (qemu-img's deprecated spelling of
// null; its own "null" is a JSON null) open the image without its backing
// file, so unallocated clusters read as zeros. Sets *filename and the
// format and open_backing of *options; returns "" or, for a bad list,
// qemu-img's message (without the "Could not open" prefix).
std::string ParseImageOpts(const std::string& opts, std::string* filename, OpenOptions* options);

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_IMAGE_OPTIONS_H_
