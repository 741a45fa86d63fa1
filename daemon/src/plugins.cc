// The table of compiled-in plugins: add a line here for a new one.
#include "plugins.h"

namespace dmcowd {

namespace {

struct Entry {
  const char* name;
  Status (*make)(const PluginOptions&, std::unique_ptr<Plugin>*);
};

constexpr Entry kPlugins[] = {
    {"cow", MakeCowPlugin},
    {"qcow2", MakeQcow2Plugin},
};

}  // namespace

Status MakePlugin(const std::string& name, const PluginOptions& options, std::unique_ptr<Plugin>* out) {
  for (const Entry& e : kPlugins) {
    if (name == e.name) return e.make(options, out);
  }
  std::string known;
  for (const Entry& e : kPlugins) known += std::string(known.empty() ? "" : ", ") + e.name;
  return Status::InvalidArgument("unknown plugin '" + name + "' (known: " + known + ")");
}

std::vector<std::string> PluginNames() {
  std::vector<std::string> names;
  for (const Entry& e : kPlugins) names.push_back(e.name);
  return names;
}

}  // namespace dmcowd
