// Output of QAPI objects the way qemu-img prints them.
//
// qemu-img builds a QDict with the QAPI output visitor and prints it either
// as pretty JSON (qobject/json-writer.c) or as an indented "key: value" dump
// (block/qapi.c dump_qobject). A QDict iterates its 512 hash buckets in
// order, newest entry first within a bucket, so the key order on screen is
// the hash order, not the schema order. Callers build an ordered_json in
// schema (insertion) order and these functions reproduce qemu's order.
#ifndef DMCOW_CLI_QEMU_JSON_H_
#define DMCOW_CLI_QEMU_JSON_H_

#include <string>

#include <nlohmann/json.hpp>

namespace dmcow::cli {

using Json = nlohmann::ordered_json;

// qobject_to_json_pretty(): 4-space indentation, no trailing newline.
std::string QemuJsonPretty(const Json& value);

// dump_qobject(indent, value): for "Format specific information:".
std::string QemuHumanDump(const Json& value, int indentation);

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_QEMU_JSON_H_
