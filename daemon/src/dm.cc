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

// Runs a task that carries a udev cookie, then waits for udev's rules to
// finish with the device (or, where udev does not run, for libdevmapper to
// make the nodes itself). The wait comes after a failed run too: it is what
// releases the cookie.
Status RunTaskWaitingForUdev(Task& t, const char* what, const std::string& name) {
  uint32_t cookie = 0;
  if (t && !dm_task_set_cookie(t.get(), &cookie, 0)) t.reset();
  g_last_error.clear();
  if (!t) return Fail(what, name);
  const int ok = dm_task_run(t.get());
  dm_udev_wait(cookie);
  dm_task_update_nodes();
  return ok ? Status::OK() : Fail(what, name);
}

}  // namespace

void Init() {
  dm_log_with_errno_init(DmLog);
  dm_udev_set_sync_support(0);
}

void InitSyncedWithUdev() {
  dm_log_with_errno_init(DmLog);
  dm_udev_set_sync_support(1);  // libdevmapper turns it off itself where udev does not run
}

bool Exists(const std::string& name) {
  Task t = NewTask(DM_DEVICE_INFO, name);
  dm_info info{};
  if (!t || !dm_task_run(t.get()) || !dm_task_get_info(t.get(), &info)) return false;
  return info.exists;
}

Status Create(const std::string& name, const std::string& uuid) {
  Task t = NewTask(DM_DEVICE_CREATE, name);
  if (t) dm_task_set_add_node(t.get(), DM_ADD_NODE_ON_RESUME);
  if (t && !uuid.empty() && !dm_task_set_uuid(t.get(), uuid.c_str())) t.reset();
  return RunTask(t, "create", name);
}

Status CreateActive(const std::string& name, const std::string& uuid, const std::vector<Target>& targets,
                    bool read_only) {
  Task t = NewTask(DM_DEVICE_CREATE, name);
  if (t && !uuid.empty() && !dm_task_set_uuid(t.get(), uuid.c_str())) t.reset();
  if (t && read_only && !dm_task_set_ro(t.get())) t.reset();
  for (const Target& x : targets) {
    if (t && !dm_task_add_target(t.get(), x.start, x.len, x.type.c_str(), x.params.c_str())) t.reset();
  }
  return RunTaskWaitingForUdev(t, "create", name);
}

Status GetInfo(const std::string& name, Info* out) {
  Task t = NewTask(DM_DEVICE_INFO, name);
  dm_info info{};
  g_last_error.clear();
  if (!t || !dm_task_run(t.get()) || !dm_task_get_info(t.get(), &info)) return Fail("info", name);
  if (!info.exists) return Status::NotFound("/dev/mapper/" + name + " does not exist");
  const char* uuid = dm_task_get_uuid(t.get());
  *out = Info{uuid ? uuid : "", info.open_count, info.major, info.minor};
  return Status::OK();
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

uint16_t UdevFlags(UdevRules rules) {
  return rules == UdevRules::kNoDisk
             ? DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG | DM_UDEV_DISABLE_DISK_RULES_FLAG | DM_UDEV_DISABLE_OTHER_RULES_FLAG
             : 0;
}

Status Resume(const std::string& name, UdevRules rules, uint32_t* udev_cookie) {
  Task t = NewTask(DM_DEVICE_RESUME, name);
  if (t) dm_task_set_add_node(t.get(), DM_ADD_NODE_ON_RESUME);
  const uint16_t flags = UdevFlags(rules);
  uint32_t no_wait = 0;  // flags alone: without udev sync there is no cookie to wait on
  uint32_t* cookie = udev_cookie ? udev_cookie : &no_wait;
  *cookie = 0;
  if (udev_cookie) dm_udev_set_sync_support(1);  // for this one task: reloads never wait on udev
  if (t && (flags || udev_cookie) && !dm_task_set_cookie(t.get(), cookie, flags)) t.reset();
  Status s = RunTask(t, "resume", name);
  if (!s.ok() && *cookie != 0) {  // nothing to wait for: release the cookie
    dm_udev_wait(*cookie);
    *cookie = 0;
  }
  if (udev_cookie) dm_udev_set_sync_support(0);
  return s;
}

void WaitForUdev(uint32_t cookie) {
  if (cookie != 0) dm_udev_wait(cookie);
}

Status Remove(const std::string& name, bool* busy) {
  *busy = false;
  Task t = NewTask(DM_DEVICE_REMOVE, name);
  Status s = RunTaskWaitingForUdev(t, "remove", name);
  if (!s.ok() && s.message().find("busy") != std::string::npos) *busy = true;
  return s;
}

}  // namespace dmcowd::dm
