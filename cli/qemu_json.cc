#include "qemu_json.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <vector>

namespace dmcow::cli {
namespace {

// qobject/qdict.c: tdb_hash(key) % QDICT_BUCKET_MAX.
unsigned QdictBucket(const std::string& key) {
  uint32_t value = 0x238F13AFu * static_cast<uint32_t>(key.size());
  for (size_t i = 0; i < key.size(); i++) {
    value += static_cast<uint32_t>(static_cast<unsigned char>(key[i])) << (i * 5 % 24);
  }
  return (1103515243u * value + 12345u) % 512;
}

// The members of `obj` in the order a QDict filled in insertion order
// iterates them: by bucket, and newest first within a bucket.
std::vector<Json::const_iterator> QdictOrder(const Json& obj) {
  struct Entry {
    unsigned bucket;
    size_t index;
    Json::const_iterator it;
  };
  std::vector<Entry> entries;
  size_t index = 0;
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    entries.push_back({QdictBucket(it.key()), index++, it});
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.bucket != b.bucket ? a.bucket < b.bucket : a.index > b.index;
  });
  std::vector<Json::const_iterator> out;
  for (const Entry& e : entries) out.push_back(e.it);
  return out;
}

// Decodes one UTF-8 sequence at s[*pos]; returns -1 for an invalid one
// (consuming one byte), like qemu's mod_utf8_codepoint().
int32_t NextCodepoint(const std::string& s, size_t* pos) {
  unsigned char c = static_cast<unsigned char>(s[*pos]);
  int len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
  if (len == 0 || *pos + len > s.size()) {
    ++*pos;
    return -1;
  }
  int32_t cp = len == 1 ? c : c & (0x7F >> len);
  for (int i = 1; i < len; i++) {
    unsigned char cc = static_cast<unsigned char>(s[*pos + i]);
    if ((cc & 0xC0) != 0x80) {
      ++*pos;
      return -1;
    }
    cp = (cp << 6) | (cc & 0x3F);
  }
  static const int32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    ++*pos;
    return -1;
  }
  *pos += len;
  return cp;
}

void AppendQuoted(std::string* out, const std::string& str) {
  char buf[16];
  *out += '"';
  for (size_t pos = 0; pos < str.size();) {
    int32_t cp = NextCodepoint(str, &pos);
    switch (cp) {
      case '"': *out += "\\\""; break;
      case '\\': *out += "\\\\"; break;
      case '\b': *out += "\\b"; break;
      case '\f': *out += "\\f"; break;
      case '\n': *out += "\\n"; break;
      case '\r': *out += "\\r"; break;
      case '\t': *out += "\\t"; break;
      default:
        if (cp < 0) cp = 0xFFFD;
        if (cp > 0xFFFF) {
          std::snprintf(buf, sizeof(buf), "\\u%04X\\u%04X", 0xD800 + ((cp - 0x10000) >> 10),
                        0xDC00 + ((cp - 0x10000) & 0x3FF));
          *out += buf;
        } else if (cp < 0x20 || cp >= 0x7F) {
          std::snprintf(buf, sizeof(buf), "\\u%04X", cp);
          *out += buf;
        } else {
          *out += static_cast<char>(cp);
        }
    }
  }
  *out += '"';
}

std::string ScalarToString(const Json& v) {
  char buf[32];
  switch (v.type()) {
    case Json::value_t::boolean: return v.get<bool>() ? "true" : "false";
    case Json::value_t::number_integer: std::snprintf(buf, sizeof(buf), "%" PRId64, v.get<int64_t>()); return buf;
    case Json::value_t::number_unsigned: std::snprintf(buf, sizeof(buf), "%" PRIu64, v.get<uint64_t>()); return buf;
    case Json::value_t::number_float: std::snprintf(buf, sizeof(buf), "%.17g", v.get<double>()); return buf;
    case Json::value_t::null: return "null";
    default: return v.get<std::string>();
  }
}

// qobject/json-writer.c with pretty = true.
class PrettyWriter {
 public:
  void Write(const std::string* name, const Json& v) {
    MaybeCommaName(name);
    if (v.is_object()) {
      out_ += '{';
      ++depth_;
      need_comma_ = false;
      for (const auto& it : QdictOrder(v)) Write(&it.key(), it.value());
      --depth_;
      Newline();
      out_ += '}';
    } else if (v.is_array()) {
      out_ += '[';
      ++depth_;
      need_comma_ = false;
      for (const Json& item : v) Write(nullptr, item);
      --depth_;
      Newline();
      out_ += ']';
    } else if (v.is_string()) {
      AppendQuoted(&out_, v.get<std::string>());
    } else {
      out_ += ScalarToString(v);
    }
    need_comma_ = true;
  }

  std::string& out() { return out_; }

 private:
  void Newline() {
    out_ += '\n';
    out_.append(depth_ * 4, ' ');
  }

  void MaybeCommaName(const std::string* name) {
    if (need_comma_) {
      out_ += ',';
      Newline();
    } else if (!out_.empty()) {
      Newline();
    }
    need_comma_ = true;
    if (name != nullptr) {
      AppendQuoted(&out_, *name);
      out_ += ": ";
    }
  }

  std::string out_;
  int depth_ = 0;
  bool need_comma_ = false;
};

void HumanDump(std::string* out, const Json& v, int indentation);

void HumanDumpEntry(std::string* out, const std::string& label, const Json& v, int indentation) {
  bool composite = v.is_object() || v.is_array();
  out->append(indentation * 4, ' ');
  *out += label;
  *out += composite ? ":\n" : ": ";
  HumanDump(out, v, indentation + 1);
  if (!composite) *out += '\n';
}

void HumanDump(std::string* out, const Json& v, int indentation) {
  if (v.is_object()) {
    for (const auto& it : QdictOrder(v)) {
      std::string key = it.key();
      std::replace(key.begin(), key.end(), '-', ' ');
      HumanDumpEntry(out, key, it.value(), indentation);
    }
  } else if (v.is_array()) {
    int i = 0;
    for (const Json& item : v) HumanDumpEntry(out, "[" + std::to_string(i++) + "]", item, indentation);
  } else {
    *out += ScalarToString(v);
  }
}

}  // namespace

std::string QemuJsonPretty(const Json& value) {
  PrettyWriter w;
  w.Write(nullptr, value);
  return std::move(w.out());
}

std::string QemuHumanDump(const Json& value, int indentation) {
  std::string out;
  HumanDump(&out, value, indentation);
  return out;
}

}  // namespace dmcow::cli
