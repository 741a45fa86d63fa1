#include "log.h"

#include <syslog.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>

namespace dmcowd {

namespace {
std::atomic<int> g_max_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<bool> g_syslog{false};
}  // namespace

void LogInit(LogLevel max_level, bool use_syslog) {
  g_max_level = static_cast<int>(max_level);
  g_syslog = use_syslog;
  if (use_syslog) openlog("dmcowd", LOG_PID | LOG_NDELAY, LOG_DAEMON);
}

bool LogEnabled(LogLevel level) { return static_cast<int>(level) <= g_max_level.load(std::memory_order_relaxed); }

void Log(LogLevel level, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (g_syslog) {
    static const int kPriority[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};
    syslog(kPriority[static_cast<int>(level)], "%s", buf);
    return;
  }
  static const char* const kPrefix[] = {"error: ", "warning: ", "", "debug: "};
  char line[1200];
  n = std::snprintf(line, sizeof(line), "dmcowd[%d]: %s%s\n", static_cast<int>(getpid()),
                    kPrefix[static_cast<int>(level)], buf);
  if (n > 0) {
    ssize_t ignored =
        ::write(2, line, static_cast<size_t>(n) < sizeof(line) ? static_cast<size_t>(n) : sizeof(line) - 1);
    (void)ignored;
  }
}

}  // namespace dmcowd
