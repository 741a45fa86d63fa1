// Status: the result of an operation that can fail, in the style of LevelDB.
//
// No exception ever leaves the library; every fallible call returns a Status.
// A non-OK Status carries a code and a one-line message that names what failed,
// which file and, where it applies, which offset, e.g.
//   "disk.qcow2: L2 table offset 0x1234 is not cluster aligned (L1 index 3)".
//
// Thread safety: a Status is a value; distinct objects may be used from
// distinct threads freely.
#ifndef DMCOW_STATUS_H_
#define DMCOW_STATUS_H_

#include <memory>
#include <string>
#include <utility>

namespace dmcow {

class Status {
 public:
  enum class Code {
    kOk = 0,
    kIoError,          // the operating system refused a read, write or sync
    kCorrupt,          // the image violates its format (hostile or damaged input)
    kNotSupported,     // valid image, but a feature we refuse (encryption, ...)
    kInvalidArgument,  // the caller asked for something impossible
    kNotFound,         // a file, snapshot or backing image does not exist
    kBusy,             // another process holds the image (QEMU-compatible lock conflict)
    kNoSpace,          // a fixed-size area (the header cluster) has no room for what was asked
  };

  // Why an encrypted layer was refused, when it was for its key: none was
  // given (kMissing), or none given unlocks it (kWrong). Callers test this,
  // never the wording: the CLI prints QEMU's words, the daemon names the
  // layer that needs a passphrase.
  enum class KeyRefusal : unsigned char { kNone, kMissing, kWrong };

  Status() = default;  // OK

  static Status OK() { return Status(); }
  static Status IOError(std::string msg) { return Status(Code::kIoError, std::move(msg)); }
  static Status Corrupt(std::string msg) { return Status(Code::kCorrupt, std::move(msg)); }
  static Status NotSupported(std::string msg) { return Status(Code::kNotSupported, std::move(msg)); }
  static Status InvalidArgument(std::string msg) { return Status(Code::kInvalidArgument, std::move(msg)); }
  static Status NotFound(std::string msg) { return Status(Code::kNotFound, std::move(msg)); }
  static Status Busy(std::string msg) { return Status(Code::kBusy, std::move(msg)); }
  static Status NoSpace(std::string msg) { return Status(Code::kNoSpace, std::move(msg)); }
  // "<layer>: <words>" (an invalid argument); `words` are QEMU's and name
  // no file.
  static Status KeyRefused(KeyRefusal why, const std::string& layer, const std::string& words) {
    Status s(Code::kInvalidArgument, layer + ": " + words);
    s.key_ = std::make_shared<KeyDetail>(KeyDetail{why, OneLine(layer), OneLine(words)});
    return s;
  }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  bool IsCorrupt() const { return code_ == Code::kCorrupt; }
  bool IsNotSupported() const { return code_ == Code::kNotSupported; }
  bool IsNotFound() const { return code_ == Code::kNotFound; }
  bool IsBusy() const { return code_ == Code::kBusy; }
  bool IsNoSpace() const { return code_ == Code::kNoSpace; }
  const std::string& message() const { return message_; }
  // The same kind of failure with another message (context added); a key
  // refusal stays one while the new message still ends with the refusal.
  Status WithMessage(std::string msg) const {
    Status s(code_, std::move(msg));
    if (key_ && s.EndsWithRefusal(*key_)) s.key_ = key_;
    return s;
  }

  KeyRefusal key_refusal() const { return key_ ? key_->why : KeyRefusal::kNone; }
  // The layer a key refusal names (its file name as the message shows it);
  // "" for any other status.
  std::string refused_layer() const { return key_ ? key_->layer : std::string(); }
  // A key refusal as QEMU words it, naming no file: the message without the
  // layer's name, so context added in front of it (one "Could not open
  // backing file: " per layer above) stays. Any other status: its message.
  std::string WithoutRefusedLayer() const {
    if (!key_) return message_;
    return message_.substr(0, message_.size() - key_->layer.size() - 2 - key_->words.size()) + key_->words;
  }

  // "OK" or the message; messages are written to be shown to a user as they are.
  std::string ToString() const { return ok() ? std::string("OK") : message_; }

 private:
  Status(Code code, std::string msg) : code_(code), message_(OneLine(std::move(msg))) {}

  // Messages quote strings taken from images (backing file names, snapshot
  // and feature names): control characters are shown as \xNN so that a
  // message is always exactly one line.
  static std::string OneLine(std::string msg) {
    auto is_control = [](unsigned char c) { return c < 0x20 || c == 0x7f; };
    bool clean = true;
    for (unsigned char c : msg) clean = clean && !is_control(c);
    if (clean) return msg;
    static const char kHex[] = "0123456789abcdef";
    std::string out;
    for (unsigned char c : msg) {
      if (is_control(c)) {
        out += "\\x";
        out += kHex[c >> 4];
        out += kHex[c & 15];
      } else {
        out += static_cast<char>(c);
      }
    }
    return out;
  }

  struct KeyDetail {
    KeyRefusal why;
    std::string layer;
    std::string words;
  };

  // Whether the message ends with "<layer>: <words>" (then a key refusal's
  // detail still describes it).
  bool EndsWithRefusal(const KeyDetail& key) const {
    const std::string tail = key.layer + ": " + key.words;
    return message_.size() >= tail.size() && message_.compare(message_.size() - tail.size(), tail.size(), tail) == 0;
  }

  Code code_ = Code::kOk;
  std::string message_;
  std::shared_ptr<const KeyDetail> key_;  // set only for key refusals: an OK status stays cheap
};

// Propagates a non-OK status to the caller.
#define DMCOW_RETURN_IF_ERROR(expr)      \
  do {                                   \
    ::dmcow::Status _dmcow_s = (expr);   \
    if (!_dmcow_s.ok()) return _dmcow_s; \
  } while (0)

}  // namespace dmcow

#endif  // DMCOW_STATUS_H_
