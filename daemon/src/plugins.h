// Factories of the compiled-in plugins (registered in plugins.cc).
#ifndef DMCOWD_PLUGINS_H_
#define DMCOWD_PLUGINS_H_

#include <memory>

#include "dmcowd/plugin.h"

namespace dmcowd {

Status MakeCowPlugin(const PluginOptions& options, std::unique_ptr<Plugin>* out);
Status MakeQcow2Plugin(const PluginOptions& options, std::unique_ptr<Plugin>* out);

}  // namespace dmcowd

#endif  // DMCOWD_PLUGINS_H_
