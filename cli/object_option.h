// --object: the user-creatable objects of qemu-img's command lines. Of
// QEMU's object types dmcow-img has the one images need, `secret` (the
// passphrases and keys of encrypted images): given inline (data=), from a
// file (file=), raw or base64 (format=), or encrypted with AES-256-CBC under
// another secret (keyid=, iv=), as QEMU's crypto/secret_common.c loads them.
//
// A value is read as qemu-img reads it: key=value pairs ("," between them,
// ",," for a comma inside a value), the first one's key "qom-type" implied,
// or a JSON object; "help" and "TYPE,help" list what can be given. Every
// check QEMU makes is made, in QEMU's order and words, when the option is
// met: a bad object ends the command before it touches an image.
#ifndef DMCOW_CLI_OBJECT_OPTION_H_
#define DMCOW_CLI_OBJECT_OPTION_H_

#include <optional>
#include <string>

namespace dmcow::cli {

// The getopt code of --object in every command's long-option table;
// ParseGetopt (cli_common.h) handles it.
inline constexpr int kObjectOption = 0x10b7;

// Parses and creates the object one --object names. Returns an exit code
// when the command ends here: 0 after help was printed, 1 after an error
// (qemu-img's message printed); nullopt when the command goes on.
std::optional<int> ProcessObjectOption(const std::string& value);

// The bytes of the secret created with id `id`, or nullptr when there is
// none. Valid until the program ends.
const std::string* FindSecret(const std::string& id);

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_OBJECT_OPTION_H_
