// dmcow-qcow's commands, shared by its files: attach, detach and list
// (dmcow_qcow.cc), mount and umount (qcow_mount.cc).
#ifndef DMCOWD_QCOW_COMMANDS_H_
#define DMCOWD_QCOW_COMMANDS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "attach_keys.h"
#include "attach_state.h"
#include "chain_files.h"

namespace dmcow_qcow {

using dmcowd::json;

struct AttachRequest {
  std::string image;
  std::string name;         // empty: from the image's file name
  std::string scratch_max;  // bytes; empty: the daemon's default
  dmcowd::ChainPolicy policy;
  bool read_only = false;
  bool partitions = true;
  dmcowd::KeySet keys;
};

// Prints "dmcow-qcow: MSG" to stderr; returns `code`.
int Fail(const std::string& msg, int code = 1);

// Parses attach's options; mount passes `partition` for its --partition N.
// What is left (IMAGE, and mount's DIR) goes to *positional. Returns the
// exit code of a refusal, else 0.
int ParseAttach(int argc, char** argv, const char* usage, AttachRequest* req, uint32_t* partition,
                std::vector<std::string>* positional);

// Attaches the image, its partitions too, and records it; *recorded is the
// record (device, partitions...). Returns the exit code: 0, or that of the
// refusal it printed (nothing is left attached then).
int AttachImage(AttachRequest& req, json* recorded);

// Removes NAME's partition mappings and devices and stops its daemons, as
// `dmcow-qcow detach NAME`; prints why not and returns 1 if it cannot.
int DetachName(const std::string& name);

int Mount(int argc, char** argv);
int Umount(int argc, char** argv);

}  // namespace dmcow_qcow

#endif  // DMCOWD_QCOW_COMMANDS_H_
