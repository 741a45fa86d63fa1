// Logging for dmcowd: one line per message to stderr, or to syslog. Never
// to a file: a file may sit on the device the daemon serves. Formatting
// uses a stack buffer; a message is written with one write(2).
#ifndef DMCOWD_LOG_H_
#define DMCOWD_LOG_H_

namespace dmcowd {

enum class LogLevel { kError = 0, kWarning = 1, kInfo = 2, kDebug = 3 };

// Messages above max_level are dropped; with use_syslog they go to the
// daemon facility instead of stderr.
void LogInit(LogLevel max_level, bool use_syslog);
bool LogEnabled(LogLevel level);
void Log(LogLevel level, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

}  // namespace dmcowd

#define DMCOWD_LOG(level, ...)                                          \
  do {                                                                  \
    if (::dmcowd::LogEnabled(level)) ::dmcowd::Log(level, __VA_ARGS__); \
  } while (0)
#define LOG_ERROR(...) DMCOWD_LOG(::dmcowd::LogLevel::kError, __VA_ARGS__)
#define LOG_WARN(...) DMCOWD_LOG(::dmcowd::LogLevel::kWarning, __VA_ARGS__)
#define LOG_INFO(...) DMCOWD_LOG(::dmcowd::LogLevel::kInfo, __VA_ARGS__)
#define LOG_DEBUG(...) DMCOWD_LOG(::dmcowd::LogLevel::kDebug, __VA_ARGS__)

#endif  // DMCOWD_LOG_H_
