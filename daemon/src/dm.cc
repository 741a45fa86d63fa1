#include "dm.h"

#include <libdevmapper.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <memory>

#include "log.h"

namespace dmcowd::dm {

namespace {

thread_local std::string g_last_error;

void DmLog(int level, const char* file, int line, int dm_errno_or_class, const char* f, ...) {
  (void)file;
  (void)line;
  (void)dm_errno_or_class;
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof(buf), f, ap);
  va_end(ap);
  level &= 7;
  if (level <= 3) {  // _LOG_ERR
    g_last_error = buf;
    LOG_DEBUG("libdevmapper: %s", buf);
  } else if (level == 4) {
    LOG_DEBUG("libdevmapper warning: %s", buf);
  }
}

struct TaskDeleter {
  void operator()(dm_task* t) const { dm_task_destroy(t); }
};
using Task = std::unique_ptr<dm_task, TaskDeleter>;

Status Fail(const std::string& what, const std::string& name) {
  std::string why = g_last_error.empty() ? "failed" : g_last_error;
  g_last_error.clear();
  return Status::IOError("device-mapper " + what + " of " + name + ": " + why);
}

Task NewTask(int type, const std::string& name) {
  Task t(dm_task_create(type));
  if (t && !dm_task_set_name(t.get(), name.c_str())) t.reset();
  return t;
}

Status RunTask(Task& t, const char* what, const std::string& name) {
  g_last_error.clear();
  if (!t) return Fail(what, name);
  const int ok = dm_task_run(t.get());
  dm_task_update_nodes();
  return ok ? Status::OK() : Fail(what, name);
}

}  // namespace

void Init() {
  dm_log_with_errno_init(DmLog);
  dm_udev_set_sync_support(0);
}

bool Exists(const std::string& name) {
  Task t = NewTask(DM_DEVICE_INFO, name);
  dm_info info{};
  if (!t || !dm_task_run(t.get()) || !dm_task_get_info(t.get(), &info)) return false;
  return info.exists;
}

Status Create(const std::string& name) {
  Task t = NewTask(DM_DEVICE_CREATE, name);
  if (t) dm_task_set_add_node(t.get(), DM_ADD_NODE_ON_RESUME);
  return RunTask(t, "create", name);
}

Status Load(const std::string& name, const std::vector<Segment>& segments, const TableDevices& devices) {
  Task t = NewTask(DM_DEVICE_RELOAD, name);
  std::string params;
  for (const Segment& s : segments) {
    if (!t) break;
    params = SegmentParams(s, devices);
    if (!dm_task_add_target(t.get(), s.start, s.len, SegmentType(s), params.c_str())) t.reset();
  }
  return RunTask(t, "table load", name);
}

Status LoadTargets(const std::string& name, const std::vector<Target>& targets) {
  Task t = NewTask(DM_DEVICE_RELOAD, name);
  for (const Target& x : targets) {
    if (!t) break;
    if (!dm_task_add_target(t.get(), x.start, x.len, x.type.c_str(), x.params.c_str())) t.reset();
  }
  return RunTask(t, "table load", name);
}

Status Suspend(const std::string& name) {
  Task t = NewTask(DM_DEVICE_SUSPEND, name);
  if (t && (!dm_task_no_flush(t.get()) || !dm_task_skip_lockfs(t.get()))) t.reset();
  return RunTask(t, "suspend", name);
}

Status Resume(const std::string& name) {
  Task t = NewTask(DM_DEVICE_RESUME, name);
  if (t) dm_task_set_add_node(t.get(), DM_ADD_NODE_ON_RESUME);
  return RunTask(t, "resume", name);
}

Status Remove(const std::string& name, bool* busy) {
  *busy = false;
  Task t = NewTask(DM_DEVICE_REMOVE, name);
  Status s = RunTask(t, "remove", name);
  if (!s.ok() && s.message().find("busy") != std::string::npos) *busy = true;
  return s;
}

}  // namespace dmcowd::dm
